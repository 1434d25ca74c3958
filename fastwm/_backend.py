"""Backend selection: which implementation a call runs ("auto", "triton" or "reference")."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

__all__ = ["BACKENDS", "backend", "get_backend", "set_backend", "use_triton"]

BACKENDS = ("auto", "triton", "reference")

# A module global rather than a thread-local or ContextVar: torch.compile traces plain globals without a graph break.
_active = "auto"


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend name must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The active backend name: "auto" (the default), "triton" or "reference"."""
    return _active


def set_backend(name: str) -> None:
    """Set the backend for the rest of the process (prefer the :func:`backend` context manager)."""
    global _active
    _active = _check_name(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run the enclosed fastwm calls on one backend.

    - ``"auto"``: CUDA tensors run the Triton kernels; CPU tensors run them when ``TRITON_INTERPRET=1`` is set (the
      Triton interpreter, slow, for tests), and the eager reference otherwise (and always for bfloat16, which the
      interpreter cannot compute).
    - ``"triton"``: always the Triton kernels; a CPU tensor without ``TRITON_INTERPRET=1``, or a bfloat16 CPU tensor,
      raises a RuntimeError.
    - ``"reference"``: always the plain PyTorch reference (float64 exact, differentiable by autograd).

    Example::

        with fastwm.backend("reference"):
            z, kl = fastwm.gaussian_sample_kl(q_mean, q_std, p_mean, p_std)
    """
    global _active
    previous = _active
    _active = _check_name(name)
    try:
        yield name
    finally:
        _active = previous


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once without importing triton, so nothing touches a GPU driver at import time.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the triton package is installed."""
    return _TRITON_FOUND


def use_triton(t: torch.Tensor) -> bool:
    """Decide, for an input tensor, whether the active backend runs the Triton kernels on it."""
    name = _active
    if name == "reference":
        return False
    on_cuda = t.device.type == "cuda"
    runnable = triton_available() and (on_cuda or (t.device.type == "cpu" and interpreter_enabled()))
    if runnable and not on_cuda and t.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The interpreter runs on NumPy, which has no bfloat16: its tl.dot on bfloat16 operands returns garbage
        # (Triton 3.6). "auto" takes the reference instead; "triton" refuses. (The variable itself, not
        # interpreter_enabled: benchmarks.aot swaps that to compile CPU-held launches for a GPU, where bf16 is fine.)
        if name == "triton":
            raise RuntimeError("fastwm backend 'triton' cannot run bfloat16 under the Triton interpreter (NumPy has "
                               "no bfloat16): use a CUDA device, another dtype, or backend 'auto' / 'reference'")
        return False
    if name == "triton" and not runnable:
        if not triton_available():
            raise RuntimeError("fastwm backend 'triton' needs the triton package: pip install 'fastwm[triton]'")
        raise RuntimeError(
            f"fastwm backend 'triton' cannot run on a {t.device.type} tensor: the kernels need a CUDA device, or "
            "TRITON_INTERPRET=1 set before fastwm's kernels are first used to run them on the CPU; "
            "use backend 'auto' or 'reference' instead"
        )
    return runnable
