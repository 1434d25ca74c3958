"""Functional recurrent cells, fused: the gate math runs in the epilogue of the cell's matrix product.

- :func:`gru_cell`: exactly ``torch.nn.GRUCell`` (gates r, z, n; its parameter layout).
- :func:`layernorm_gru_cell`: the Dreamer LayerNorm GRU (DreamerV2, dreamerv3-torch).

Both accept x [B, X] and h [B, D] (or unbatched [X] and [D], as GRUCell does) in any floating dtype; float64 computes
in float64, the others accumulate in float32. Inside an autocast region for their device type, their float32, float16
and bfloat16 arguments are cast to its dtype first, as autocast casts ``torch.nn.GRUCell``'s (see :mod:`fastwm._amp`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from ._amp import autocast_on, cast_args, no_autocast
from ._backend import use_triton
from ._validation import check_float, check_like, check_tensor, check_values

__all__ = ["gru_cell", "layernorm_gru_cell"]


def _autocast(x: object) -> bool:
    """Whether the cell's arguments are cast for autocast: an autocast region for x's device type, and an x autocast
    would cast (a float64 x is left alone, and the dtype checks then name what was passed)."""
    return isinstance(x, Tensor) and x.dtype != torch.float64 and autocast_on(x.device)


def _check_xh(x: object, h: object) -> tuple[Tensor, Tensor, bool]:
    x = check_tensor("x", x)
    h = check_tensor("h", h)
    if x.dim() not in (1, 2):
        raise ValueError(f"x must have shape [B, X] or [X], got {tuple(x.shape)}")
    if h.dim() != x.dim() or (x.dim() == 2 and h.shape[0] != x.shape[0]):
        want = f"[{x.shape[0]}, D] like x's batch" if x.dim() == 2 else "[D] like the unbatched x"
        raise ValueError(f"h must have shape {want}, got {tuple(h.shape)}")
    if h.dtype != x.dtype:
        raise TypeError(f"h must have the dtype of x ({x.dtype}), got {h.dtype}")
    if h.device != x.device:
        raise ValueError(f"h must be on the device of x ({x.device}), got {h.device}")
    return x, h, x.dim() == 1


def gru_cell(
    x: Tensor,
    h: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
) -> Tensor:
    """h' = torch.nn.GRUCell(x, h) with the given parameters, fused.

    Args:
        x: [B, X] input.
        h: [B, D] previous state.
        weight_ih: [3D, X], rows r, z, n (GRUCell.weight_ih).
        weight_hh: [3D, D] (GRUCell.weight_hh).
        bias_ih, bias_hh: [3D] or None.

    Returns:
        h' [B, D] in x's dtype. Differentiable with respect to every tensor argument.
    """
    if _autocast(x):
        with no_autocast(x.device):
            return gru_cell(*cast_args(x.device, x, h, weight_ih, weight_hh, bias_ih, bias_hh))
    x, h, unbatched = _check_xh(x, h)
    d, xw = h.shape[-1], x.shape[-1]
    check_like("weight_ih", weight_ih, "x", x, shape=(3 * d, xw))
    check_like("weight_hh", weight_hh, "x", x, shape=(3 * d, d))
    if bias_ih is not None:
        check_like("bias_ih", bias_ih, "x", x, shape=(3 * d,))
    if bias_hh is not None:
        check_like("bias_hh", bias_hh, "x", x, shape=(3 * d,))
    check_values({"x": x, "h": h, "weight_ih": weight_ih, "weight_hh": weight_hh, "bias_ih": bias_ih,
                  "bias_hh": bias_hh})
    if unbatched:
        return gru_cell(x[None], h[None], weight_ih, weight_hh, bias_ih, bias_hh)[0]
    if use_triton(x):
        from .step_ops import fused_gru_cell

        return fused_gru_cell(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    return reference.gru_cell(x, h, weight_ih, weight_hh, bias_ih, bias_hh)


def layernorm_gru_cell(
    x: Tensor,
    h: Tensor,
    weight: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    *,
    eps: float = 1e-3,
    update_bias: float = -1.0,
) -> Tensor:
    """h' of the Dreamer LayerNorm GRU, fused.

    parts = LayerNorm(cat([x, h]) @ weight.T) over the 3D outputs; reset, cand, update = split(parts, 3);
    reset = sigmoid(reset); cand = tanh(reset * cand); update = sigmoid(update + update_bias);
    h' = update * cand + (1 - update) * h.

    Args:
        x: [B, X] input.
        h: [B, D] previous state.
        weight: [3D, X + D], no bias.
        norm_weight, norm_bias: [3D], the LayerNorm's affine parameters.
        eps: the LayerNorm eps (1e-3 in dreamerv3-torch).
        update_bias: added to the update gate before its sigmoid (-1 in Dreamer).
    """
    if _autocast(x):
        with no_autocast(x.device):
            x, h, weight, norm_weight, norm_bias = cast_args(x.device, x, h, weight, norm_weight, norm_bias)
            return layernorm_gru_cell(x, h, weight, norm_weight, norm_bias, eps=eps, update_bias=update_bias)
    x, h, unbatched = _check_xh(x, h)
    d, xw = h.shape[-1], x.shape[-1]
    check_like("weight", weight, "x", x, shape=(3 * d, xw + d))
    check_like("norm_weight", norm_weight, "x", x, shape=(3 * d,))
    check_like("norm_bias", norm_bias, "x", x, shape=(3 * d,))
    check_float("eps", eps)
    check_float("update_bias", update_bias)
    if not 0 < eps < math.inf:
        raise ValueError(f"eps must be > 0 and finite, got {eps!r}")
    if not math.isfinite(update_bias):
        raise ValueError(f"update_bias must be finite, got {update_bias!r}")
    check_values({"x": x, "h": h, "weight": weight, "norm_weight": norm_weight, "norm_bias": norm_bias})
    if unbatched:
        return layernorm_gru_cell(x[None], h[None], weight, norm_weight, norm_bias, eps=eps,
                                  update_bias=update_bias)[0]
    if use_triton(x):
        from .step_ops import fused_layernorm_gru_cell

        return fused_layernorm_gru_cell(x, h, weight, norm_weight, norm_bias, float(eps), float(update_bias))
    return reference.layernorm_gru_cell(x, h, weight, norm_weight, norm_bias, eps=eps, update_bias=update_bias)
