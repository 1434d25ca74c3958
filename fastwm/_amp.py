"""Automatic mixed precision (``torch.autocast``) for fastwm's layers.

PyTorch's autocast casts the inputs of each listed op (``linear``, ``gru_cell``, ...) to its lower precision dtype and
leaves the others in float32, op by op. fastwm's fused layers are single ops, so they follow the rule of the listed
matrix-product ops, once for the whole layer:

- Inside an autocast region enabled for the parameters' device type, an RSSM (or a functional cell) whose parameters
  are float32 computes exactly what the same model would with its parameters and inputs cast to the autocast dtype
  (float16 or bfloat16): the casts are differentiable, so the gradients reach the float32 parameters. Its outputs are
  in the autocast dtype; std and KL are computed in float32 as always, and KL is returned in float32.
- The layer's own body then runs with autocast off, on both backends: the reference path's softplus, LayerNorm or
  exp, which autocast would promote to float32 one by one, stay in the computing dtype, as in the kernels.
- Parameters in another dtype (a model already moved to bfloat16, or float64) keep it, autocast or not.
- The custom ops' backward runs with autocast off too (as ``torch.amp.custom_bwd`` arranges), so a ``backward()``
  called inside the region gives the same gradients as one called after it.
- A user callable run from inside a layer (a policy, a reward) runs in the caller's autocast region again.

A model's own time loops (``observe``, ``imagine``, ``rollout``) cast the weights once per call; a Python loop of
``img_step`` / ``obs_step`` pays the casts (one small copy per weight) on every call.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ELIGIBLE", "autocast_again", "autocast_dtype", "autocast_on", "cast", "cast_args", "cast_eligible",
           "no_autocast", "outer_dtype", "without_autocast"]

_LOWER = (torch.float16, torch.bfloat16)
ELIGIBLE = (torch.float32, *_LOWER)  # the dtypes autocast casts (float64 it leaves alone)


def autocast_on(device: torch.device) -> bool:
    """Whether an autocast region is enabled for ``device``'s type (cpu, cuda, ...)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False


def outer_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the autocast region enabled for ``device``'s type, or None when there is none."""
    return torch.get_autocast_dtype(device.type) if autocast_on(device) else None


def autocast_dtype(like: Tensor) -> torch.dtype | None:
    """The dtype a layer whose parameters are like ``like`` computes in under autocast: autocast's float16 or
    bfloat16 when autocast is on for ``like``'s device type and ``like`` is float32 (and the two differ), else None
    (no cast)."""
    if like.dtype != torch.float32:
        return None
    dtype = outer_dtype(like.device)
    return dtype if dtype in _LOWER else None


def cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """``t`` in ``dtype`` (differentiably; the same tensor when it already is, or when either is None)."""
    if t is None or dtype is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def cast_eligible(t: object, dtype: torch.dtype) -> object:
    """``t`` cast to ``dtype`` as autocast would: a float32, float16 or bfloat16 tensor is, a float64 one or a
    non-tensor is left as it is."""
    return cast(t, dtype) if isinstance(t, Tensor) and t.dtype in ELIGIBLE else t


def cast_args(device: torch.device, *ts: object) -> tuple[object, ...]:
    """The functional ops' rule (autocast's own for ``gru_cell``): under autocast for ``device``'s type, every
    float32, float16 or bfloat16 tensor among ``ts`` cast to its dtype; float64 ones and non-tensors as they are."""
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(cast_eligible(t, dtype) for t in ts)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for ``device``'s type while a fused layer's body runs (a no-op context when it is off already)."""
    if autocast_on(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def autocast_again(device: torch.device, dtype: torch.dtype | None, *,
                   cache: bool | None = None) -> contextlib.AbstractContextManager:
    """Autocast back on for a user callable run from inside a layer's body (a policy, a reward): ``dtype`` is
    :func:`outer_dtype` taken before the body turned it off (None: it was off, and stays so). ``cache``: autocast's
    weight-cast cache (the caller's setting when None; a CUDA graph must not read casts cached outside it)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def without_autocast(backward: Callable) -> Callable:
    """A custom op's backward ``(ctx, *grads)`` run with autocast off for its gradients' device types: a
    ``backward()`` called inside an autocast region would otherwise run the backward's float32 products (the weight
    gradients) in the autocast dtype."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        with contextlib.ExitStack() as stack:
            for device in {g.device for g in grads if isinstance(g, Tensor)}:
                stack.enter_context(no_autocast(device))
            return backward(ctx, *grads)

    return run
