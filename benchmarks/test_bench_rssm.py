"""pytest-benchmark view of the RSSM cases (``pytest benchmarks/``), built by the same code as the harness.

Not part of the CI test run (``testpaths = ["tests"]``). On cuda the cases run at the real sizes (PlaNet / Dreamer V1
and dreamerv3-torch, float32) for every provider; on the CPU they run at the tiny quick sizes, eager only (compiled is
slow to build there, graphed needs cuda, and fastwm runs there only under the Triton interpreter:
``TRITON_INTERPRET=1 pytest benchmarks/``).
"""

from __future__ import annotations

import pytest
import torch

from ._common import run_benchmark
from .bench_rssm import (
    BENCHMARKS,
    MODES,
    OBSERVE_ONLY,
    SIZES,
    build_case,
    case_id,
    provider_unavailable,
    row_steps,
    size_for,
    steps_per_call,
)
from .bench_rssm import PROVIDERS as ALL_PROVIDERS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
QUICK = not ON_CUDA
DTYPE = torch.float32
PROVIDERS = ALL_PROVIDERS if ON_CUDA else ("eager", "fastwm", "recompute")

CASES = [(b, mode, provider, size) for b in BENCHMARKS for mode in MODES for size in SIZES for provider in PROVIDERS
         if provider not in OBSERVE_ONLY or b == "observe"]


@pytest.mark.parametrize(
    ("benchmark_name", "mode", "provider", "size_name"),
    CASES,
    ids=[case_id(b, m, p, size_for(s, QUICK), DTYPE) for b, m, p, s in CASES],
)
def test_rssm(benchmark, benchmark_name: str, mode: str, provider: str, size_name: str) -> None:
    """Time one case; extra_info carries the size and, after timing, microseconds per step and row-steps per second."""
    reason = provider_unavailable(provider, DEVICE, DTYPE)
    if reason is not None:
        pytest.skip(reason)
    size = size_for(size_name, QUICK)
    case = build_case(benchmark_name, mode, provider, size, DTYPE, DEVICE)
    steps = steps_per_call(size, benchmark_name)
    benchmark.extra_info.update(
        size=size.name,
        B=size.B,
        T=steps,
        deter=size.deter,
        stoch=size.stoch,
        hidden=size.hidden,
        cell=size.cell,
        dtype=str(DTYPE).removeprefix("torch."),
        compile_mode=case.compile_mode,
    )
    median_s = run_benchmark(benchmark, case.fn, ON_CUDA)
    if median_s is not None:
        benchmark.extra_info["us_per_step"] = median_s * 1e6 / steps
        benchmark.extra_info["row_steps_per_s"] = row_steps(size, benchmark_name) / median_s
