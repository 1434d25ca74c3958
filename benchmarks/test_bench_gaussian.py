"""pytest-benchmark view of the Gaussian cases (``pytest benchmarks/``), built by the same code as the harness.

Not part of the CI test run (``testpaths = ["tests"]``). On the CPU the cases are tiny and the fastwm provider runs
only under the Triton interpreter (``TRITON_INTERPRET=1 pytest benchmarks/``); compiled cases run on cuda only.
"""

from __future__ import annotations

import pytest
import torch

from ._common import run_benchmark
from .bench_gaussian import MODES, OPS, build_case, case_id, provider_unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
ROWS, S = (65536, 32) if ON_CUDA else (256, 32)
DTYPE = torch.float32
PROVIDERS = ("eager", "compiled", "fastwm") if ON_CUDA else ("eager", "fastwm")

CASES = [(op, mode, provider) for op in OPS for mode in MODES for provider in PROVIDERS]


@pytest.mark.parametrize(("op", "mode", "provider"), CASES, ids=[case_id(*c, ROWS, S, DTYPE) for c in CASES])
def test_gaussian(benchmark, op: str, mode: str, provider: str) -> None:
    """Time one case; extra_info carries the byte count and the bandwidth it reached."""
    reason = provider_unavailable(provider, DEVICE, DTYPE)
    if reason is not None:
        pytest.skip(reason)
    case = build_case(op, mode, provider, ROWS, S, DTYPE, DEVICE)
    benchmark.extra_info.update(rows=ROWS, S=S, dtype=str(DTYPE).removeprefix("torch."), bytes_moved=case.bytes_moved)
    median_s = run_benchmark(benchmark, case.fn, ON_CUDA)
    if median_s is not None:
        benchmark.extra_info["gbps"] = case.bytes_moved / median_s / 1e9
