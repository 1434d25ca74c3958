"""Benchmark cases of the Gaussian latent ops: the one definition the harness and the pytest-benchmark file share.

A case is (op, mode, provider, rows, S, dtype, device):

* op: one of :data:`OPS`, named after the public fastwm function it times;
* mode: ``"forward"`` (inputs without gradients) or ``"full"`` (forward then ``torch.autograd.grad`` with fixed random
  upstream gradients, the same as backward of ``(z * gz).sum() + (kl * gk).sum()`` without the extra reductions);
* provider: ``"eager"`` (the functions of :mod:`fastwm.reference`, noise drawn by ``torch.randn`` inside the timed
  call, as eager user code does), ``"compiled"`` (the same function under ``torch.compile``) or ``"fastwm"`` (the public
  fastwm function under ``fastwm.backend("triton")`` with ``noise=None``: the noise is drawn in the kernel).

:func:`build_case` returns a zero-argument callable that runs the case once, plus the byte count it is judged by:
the minimal traffic of the op in that mode (each input read once, each output written once, and in backward each
upstream gradient read once and each input gradient written once), see :func:`bytes_moved`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import fastwm
from fastwm import reference

from ._common import DTYPES, baseline_unavailable, kernels_unavailable

__all__ = [
    "DTYPES",
    "MODES",
    "OPS",
    "PROVIDERS",
    "BenchCase",
    "all_cases",
    "build_case",
    "bytes_moved",
    "case_id",
    "input_bytes",
    "provider_unavailable",
]

OPS = ("std_from_raw", "gaussian_rsample", "gaussian_kl", "gaussian_sample_kl", "gaussian_head_sample_kl")
MODES = ("forward", "full")
PROVIDERS = ("eager", "compiled", "fastwm")

Forward = Callable[..., tuple[Tensor, ...]]


# ----------------------------------------------------------------------------------------------------------------------
# The forward of each op, per provider. Each returns every output of the op as a tuple.
# ----------------------------------------------------------------------------------------------------------------------


def _noise_for(t: Tensor, s: int) -> Tensor:
    """Standard normals [rows, S] in t's dtype and device (the eager provider's noise, drawn inside the timed call)."""
    return torch.randn((*t.shape[:-1], s), dtype=t.dtype, device=t.device)


def _eager_std_from_raw(raw: Tensor) -> tuple[Tensor, ...]:
    return (reference.std_from_raw(raw),)


def _eager_rsample(mean: Tensor, std: Tensor) -> tuple[Tensor, ...]:
    return (reference.gaussian_rsample(mean, std, _noise_for(mean, mean.shape[-1])),)


def _eager_kl(q_mean: Tensor, q_std: Tensor, p_mean: Tensor, p_std: Tensor) -> tuple[Tensor, ...]:
    return (reference.gaussian_kl(q_mean, q_std, p_mean, p_std),)


def _eager_sample_kl(q_mean: Tensor, q_std: Tensor, p_mean: Tensor, p_std: Tensor) -> tuple[Tensor, ...]:
    return reference.gaussian_sample_kl(q_mean, q_std, p_mean, p_std, _noise_for(q_mean, q_mean.shape[-1]))


def _eager_head(post_raw: Tensor, prior_raw: Tensor) -> tuple[Tensor, ...]:
    noise = _noise_for(post_raw, post_raw.shape[-1] // 2)
    return tuple(reference.gaussian_head_sample_kl(post_raw, prior_raw, noise))


def _fastwm_std_from_raw(raw: Tensor) -> tuple[Tensor, ...]:
    return (fastwm.std_from_raw(raw),)


def _fastwm_rsample(mean: Tensor, std: Tensor) -> tuple[Tensor, ...]:
    return (fastwm.gaussian_rsample(mean, std),)


def _fastwm_kl(q_mean: Tensor, q_std: Tensor, p_mean: Tensor, p_std: Tensor) -> tuple[Tensor, ...]:
    return (fastwm.gaussian_kl(q_mean, q_std, p_mean, p_std),)


def _fastwm_sample_kl(q_mean: Tensor, q_std: Tensor, p_mean: Tensor, p_std: Tensor) -> tuple[Tensor, ...]:
    return tuple(fastwm.gaussian_sample_kl(q_mean, q_std, p_mean, p_std))


def _fastwm_head(post_raw: Tensor, prior_raw: Tensor) -> tuple[Tensor, ...]:
    return tuple(fastwm.gaussian_head_sample_kl(post_raw, prior_raw))


# ----------------------------------------------------------------------------------------------------------------------
# Op table
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OpSpec:
    """What one op reads and writes, in units of [rows, S] tensors of the input dtype ("ns") and of [rows] KL vectors
    (float32, float64 for float64 inputs)."""

    inputs: tuple[str, ...]  # per input: "mean", "std" or "raw" ([rows, S]), or "head" ([rows, 2S] raw head output)
    grad_outputs: tuple[str, ...]  # per output that gets an upstream gradient in full mode: "ns" or "kl"
    eager: Forward
    fastwm: Forward
    fwd_ns: int  # minimal forward traffic: [rows, S] tensors read + written
    fwd_kl: int  # [rows] KL vectors written by the forward
    bwd_ns: int  # minimal backward traffic: upstream grads and inputs read, input grads written
    bwd_kl: int  # [rows] upstream KL gradients read by the backward


_SPECS: dict[str, _OpSpec] = {
    # raw -> std; backward reads g_std and raw, writes d_raw.
    "std_from_raw": _OpSpec(("raw",), ("ns",), _eager_std_from_raw, _fastwm_std_from_raw, 2, 0, 3, 0),
    # mean, std -> z; backward reads g_z and writes d_std = g_z * noise (d_mean is g_z itself, noise regenerated).
    "gaussian_rsample": _OpSpec(("mean", "std"), ("ns",), _eager_rsample, _fastwm_rsample, 3, 0, 2, 0),
    # 4 inputs -> kl; backward reads g_kl and the 4 inputs, writes 4 grads.
    "gaussian_kl": _OpSpec(("mean", "std", "mean", "std"), ("kl",), _eager_kl, _fastwm_kl, 4, 1, 8, 1),
    # 4 inputs -> z, kl; backward reads g_z, g_kl and the 4 inputs, writes 4 grads.
    "gaussian_sample_kl": _OpSpec(
        ("mean", "std", "mean", "std"), ("ns", "kl"), _eager_sample_kl, _fastwm_sample_kl, 5, 1, 9, 1
    ),
    # 2 raw [rows, 2S] -> z, kl, 4 means / stds; backward reads g_z, g_kl and the 2 raws, writes the 2 raw grads.
    "gaussian_head_sample_kl": _OpSpec(("head", "head"), ("ns", "kl"), _eager_head, _fastwm_head, 9, 1, 9, 1),
}


def _check(op: str, mode: str | None = None, provider: str | None = None) -> _OpSpec:
    if op not in _SPECS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if provider is not None and provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    return _SPECS[op]


def _kl_itemsize(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4


def bytes_moved(op: str, mode: str, rows: int, s: int, dtype: torch.dtype) -> int:
    """The minimal bytes one call of ``op`` in ``mode`` reads and writes (noise drawn in registers, not stored)."""
    spec = _check(op, mode)
    ns, kl = spec.fwd_ns, spec.fwd_kl
    if mode == "full":
        ns, kl = ns + spec.bwd_ns, kl + spec.bwd_kl
    return ns * rows * s * dtype.itemsize + kl * rows * _kl_itemsize(dtype)


def input_bytes(op: str, rows: int, s: int, dtype: torch.dtype) -> int:
    """The size of the op's input tensors (what the harness bounds to keep large cases in device memory)."""
    spec = _check(op)
    elems = sum(rows * (2 * s if kind == "head" else s) for kind in spec.inputs)
    return elems * dtype.itemsize


def provider_unavailable(provider: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``provider`` cannot run on ``device`` in ``dtype`` here, or None when it can."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider != "fastwm":
        return baseline_unavailable(provider, device)
    return kernels_unavailable(
        device, dtype, "fastwm runs on the CPU only under the Triton interpreter: set TRITON_INTERPRET=1"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Case builder
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class BenchCase:
    """One built case: ``fn()`` runs it once (asynchronously on cuda: the caller synchronizes)."""

    op: str
    mode: str
    provider: str
    rows: int
    s: int
    dtype: torch.dtype
    device: torch.device
    fn: Callable[[], object]
    bytes_moved: int


def _make_input(kind: str, rows: int, s: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensor:
    width = 2 * s if kind == "head" else s
    t = torch.randn((rows, width), generator=gen, dtype=dtype, device=device)
    if kind == "std":
        t.mul_(0.5).exp_().add_(0.05)  # log-normal stds around 1, bounded away from 0
    return t


def _compiled(forward: Forward, device: torch.device) -> Forward:
    # A fresh dynamo cache per case: each case compiles for its static shapes, and the many (op, shape, dtype) cases of
    # one run never reach the recompile limit of the shared forward functions (past it dynamo silently runs eager).
    torch._dynamo.reset()
    if device.type == "cuda":
        return torch.compile(forward, mode="max-autotune-no-cudagraphs", dynamic=False)
    return torch.compile(forward, dynamic=False)


def _forward_for(spec: _OpSpec, provider: str, device: torch.device) -> Forward:
    if provider == "eager":
        return spec.eager
    if provider == "compiled":
        return _compiled(spec.eager, device)
    fused = spec.fastwm

    def run_fastwm(*inputs: Tensor) -> tuple[Tensor, ...]:
        with fastwm.backend("triton"):
            return fused(*inputs)

    return run_fastwm


def build_case(
    op: str,
    mode: str,
    provider: str,
    rows: int,
    s: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    seed: int = 0,
) -> BenchCase:
    """Allocate the inputs of a case (seeded) and return the callable that runs it once.

    The "compiled" provider calls ``torch._dynamo.reset()`` here and compiles on the callable's first call, so build
    and warm up (call ``fn`` once) one compiled case before building the next. Run :func:`provider_unavailable` first:
    the "fastwm" provider raises on a device it cannot run on.
    """
    spec = _check(op, mode, provider)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    inputs = [_make_input(kind, rows, s, dtype, device, gen) for kind in spec.inputs]
    forward = _forward_for(spec, provider, device)
    n_bytes = bytes_moved(op, mode, rows, s, dtype)

    if mode == "forward":

        def fn() -> object:
            return forward(*inputs)

    else:
        leaves = [t.requires_grad_() for t in inputs]
        upstream = [
            torch.randn((rows, s), generator=gen, dtype=dtype, device=device)
            if kind == "ns"
            else torch.randn(
                (rows,), generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device
            )
            for kind in spec.grad_outputs
        ]
        n_grad = len(upstream)

        def fn() -> object:
            # autograd.grad rather than backward: nothing accumulates into .grad between repetitions.
            outs = forward(*leaves)
            return torch.autograd.grad(outs[:n_grad], leaves, upstream)

    return BenchCase(op, mode, provider, rows, s, dtype, device, fn, n_bytes)


def case_id(op: str, mode: str, provider: str, rows: int, s: int, dtype: torch.dtype) -> str:
    """A short readable id of a case (pytest ids, progress lines)."""
    return f"{op}-{mode}-{provider}-{rows}x{s}-{str(dtype).removeprefix('torch.')}"


def all_cases(
    ops: Sequence[str], modes: Sequence[str], providers: Sequence[str], rows: Sequence[int], sizes: Sequence[int]
) -> list[tuple[str, str, str, int, int]]:
    """The cross product (op, mode, provider, rows, S), providers innermost so eager runs before the others."""
    return [(op, mode, p, r, s) for op in ops for mode in modes for r in rows for s in sizes for p in providers]
