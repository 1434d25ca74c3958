"""pytest-benchmark view of the imagination and planning cases (``pytest benchmarks/``), built by the same code as
the harness.

Not part of the CI test run (``testpaths = ["tests"]``). On cuda the imagination cases run at the real sizes (PlaNet /
Dreamer V1 and dreamerv3-torch, float32) for Dreamer V1's 2,500 and TorchRL's 10,000 starts over 15 steps, for every
provider, and the CEM decision at PlaNet's settings for 1 and 16 beliefs; on the CPU they run at the tiny quick sizes
(64 starts, 5 steps; CEM with 100 candidates, horizon 5, 3 iterations), eager only (compiled is slow to build there,
graphed needs cuda, and fastwm runs there only under the Triton interpreter: ``TRITON_INTERPRET=1 pytest
benchmarks/``).
"""

from __future__ import annotations

import pytest
import torch

from ._common import run_benchmark
from .bench_rollout import (
    CEM_PROVIDERS,
    IMAGINE_BENCHMARKS,
    all_cases,
    build_case,
    build_cem_case,
    case_id,
    cem_settings,
    flop_per_row_step,
    provider_unavailable,
    reward_hidden_for,
    row_steps,
    size_for,
)
from .bench_rssm import SIZES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
QUICK = not ON_CUDA
DTYPE = torch.float32
PROVIDERS = ("eager", "compiled", "graphed", "fastwm") if ON_CUDA else ("eager", "fastwm")
NS = (2500, 10000) if ON_CUDA else (64,)
HS = (15,) if ON_CUDA else (5,)
BELIEFS = (1, 16)
REWARD_HIDDEN = reward_hidden_for(QUICK)

CASES = all_cases(IMAGINE_BENCHMARKS, PROVIDERS, tuple(SIZES), NS, HS)
CEM_CASES = [(provider, beliefs) for beliefs in BELIEFS for provider in CEM_PROVIDERS]


@pytest.mark.parametrize(
    ("benchmark_name", "provider", "size_name", "n", "horizon"),
    CASES,
    ids=[case_id(b, p, size_for(s, QUICK), n, h, DTYPE) for b, p, s, n, h in CASES],
)
def test_imagine(benchmark, benchmark_name: str, provider: str, size_name: str, n: int, horizon: int) -> None:
    """Time one imagination case; extra_info carries the shape and, after timing, row-steps per second and TFLOP/s."""
    reason = provider_unavailable(provider, DEVICE, DTYPE, benchmark_name)
    if reason is not None:
        pytest.skip(reason)
    size = size_for(size_name, QUICK)
    case = build_case(benchmark_name, provider, size, n, horizon, DTYPE, DEVICE, reward_hidden=REWARD_HIDDEN)
    flop = flop_per_row_step(size, benchmark_name, REWARD_HIDDEN)
    benchmark.extra_info.update(
        size=size.name,
        N=n,
        H=horizon,
        deter=size.deter,
        stoch=size.stoch,
        hidden=size.hidden,
        cell=size.cell,
        dtype=str(DTYPE).removeprefix("torch."),
        compile_mode=case.compile_mode,
        flop_per_row_step=flop,
    )
    median_s = run_benchmark(benchmark, case.fn, ON_CUDA)
    if median_s is not None:
        rate = row_steps(benchmark_name, n, horizon) / median_s
        benchmark.extra_info["row_steps_per_s"] = rate
        benchmark.extra_info["tflops"] = rate * flop / 1e12


@pytest.mark.parametrize(
    ("provider", "beliefs"),
    CEM_CASES,
    ids=[
        case_id("cem_decision", p, size_for("planet", QUICK), 0, 0, DTYPE, cem=cem_settings(b, QUICK))
        for p, b in CEM_CASES
    ],
)
def test_cem_decision(benchmark, provider: str, beliefs: int) -> None:
    """Time one CEM decision at PlaNet's settings (tiny ones on the CPU); extra_info carries the settings and, after
    timing, milliseconds per decision and imagined row-steps per second."""
    reason = provider_unavailable(provider, DEVICE, DTYPE, "cem_decision")
    if reason is not None:
        pytest.skip(reason)
    size = size_for("planet", QUICK)
    settings = cem_settings(beliefs, QUICK)
    case = build_cem_case(provider, size, settings, DTYPE, DEVICE, reward_hidden=REWARD_HIDDEN)
    benchmark.extra_info.update(
        size=size.name,
        beliefs=settings.beliefs,
        horizon=settings.horizon,
        candidates=settings.candidates,
        top_k=settings.top_k,
        iterations=settings.iterations,
        dtype=str(DTYPE).removeprefix("torch."),
    )
    median_s = run_benchmark(benchmark, case.fn, ON_CUDA)
    if median_s is not None:
        benchmark.extra_info["ms_per_decision"] = median_s * 1e3
        benchmark.extra_info["row_steps_per_s"] = row_steps("cem_decision", 0, 0, settings) / median_s
