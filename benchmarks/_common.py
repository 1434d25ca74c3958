"""What the benchmark modules share: the dtypes they run, why a provider cannot run on a device, and the
pytest-benchmark timing of the ``test_bench_*`` files."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from fastwm._backend import interpreter_enabled, triton_available

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

INTERPRETER_HINT = "fastwm runs on the CPU only under the slow Triton interpreter: set TRITON_INTERPRET=1 to time it"


def baseline_unavailable(provider: str, device: torch.device) -> str | None:
    """Why eager or compiled cannot run on ``device``, or None when it can."""
    if provider == "compiled" and device.type == "cuda" and not triton_available():
        return "torch.compile on cuda generates Triton kernels: install triton"
    return None


def graph_unavailable(device: torch.device) -> str | None:
    """Why a provider replaying a CUDA graph cannot run on ``device``, or None when it can."""
    return "CUDA graphs need a cuda device" if device.type != "cuda" else None


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def kernels_unavailable(
    device: torch.device, dtype: torch.dtype, interpreter_hint: str = INTERPRETER_HINT,
    needs: tuple[str, str] | None = None,
) -> str | None:
    """Why fastwm's Triton kernels cannot run on ``device`` in ``dtype``, or None when they can. ``needs``: (module,
    what to say when it is missing), a module of the checkout the provider runs."""
    if not triton_available():
        return "fastwm needs the triton package (pip install 'fastwm[triton]')"
    if needs is not None and not _module_present(needs[0]):
        return needs[1]
    if device.type == "cpu":
        if not interpreter_enabled():
            return interpreter_hint
        if dtype == torch.bfloat16:
            return "the Triton interpreter runs on NumPy, which has no bfloat16"
    elif device.type != "cuda":
        return f"fastwm's kernels need a CUDA device (or the CPU interpreter), got {device.type}"
    return None


def compiled_tag(provider: str, compile_mode: str | None) -> str:
    """A provider in a case id: ``compiled[mode]`` for a compile mode other than the cuda default."""
    return provider if compile_mode in (None, "max-autotune-no-cudagraphs") else f"{provider}[{compile_mode}]"


def run_benchmark(benchmark, fn: Callable[[], object], on_cuda: bool) -> float | None:
    """pytest-benchmark: warm ``fn`` up (compiles and JITs outside the timing), time it (synchronized on cuda; a few
    fixed rounds on the CPU, where the interpreter takes tens of milliseconds a call) and return the median seconds
    (None when timing is disabled)."""

    def run() -> None:
        fn()
        if on_cuda:
            torch.cuda.synchronize()

    run()
    if on_cuda:
        benchmark(run)
    else:
        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        return stats.stats.median
    return None
