"""The fused path of the cells and the RSSM step: custom ops around ``fastwm.kernels.rssm`` and their autograd.

Each forward is one Triton launch. Each backward is one Triton launch for everything per row (the reverse walk through
the step's layers, producing the input gradients and every layer's pre-activation gradient), then the weight
gradients as plain matrix products over the batch, ``d_pre.T @ layer_input`` (deterministic; no atomics).

The ops are registered with ``torch.library.custom_op`` (plus fake and autograd registrations) so that
``torch.compile`` traces through them. The noise inputs are treated as constants (no gradient flows to them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._amp import without_autocast
from .gaussian import _STD_MODE_IDS

__all__ = ["fused_prior_step", "fused_posterior_step", "fused_gru_cell", "fused_layernorm_gru_cell"]


def _kernels():
    from .kernels import rssm as kernels

    return kernels


_CELL_IDS = {"gru": 0, "layernorm_gru": 1, "none": 2}
_ACT_IDS = {"elu": 0, "silu": 1}
_STD_IDS = _STD_MODE_IDS  # the kernels' STD_MODE constexpr, as for the Gaussian ops
_UPDATE_BIAS = -1.0
_N_OUT = 8  # deter', prior (z, mean, std), posterior (z, mean, std), kl
_N_SAVED = 13


def _c(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _present(t: Tensor) -> Tensor | None:
    """A weight, contiguous, or None where the configuration has none (passed as an empty tensor)."""
    return None if t.numel() == 0 else t.contiguous()


def _cdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------------

_STEP_SCHEMA = (
    "(Tensor stoch, Tensor action, Tensor deter, Tensor? embed, Tensor? noise, Tensor? prior_noise, Tensor? seed, "
    "Tensor[] weights, int cell, int act, bool norm, bool post, int std_mode, float min_std, float eps) -> ("
    + ", ".join(["Tensor"] * (_N_OUT + _N_SAVED)) + ")"
)


@torch.library.custom_op("fastwm::rssm_step", mutates_args=(), schema=_STEP_SCHEMA)
def _step_op(stoch, action, deter, embed, noise, prior_noise, seed, weights, cell, act, norm, post, std_mode,
             min_std, eps):
    return _kernels().step_fwd(
        stoch.contiguous(), action.contiguous(), deter.contiguous(), _c(embed), _c(noise), _c(prior_noise), seed,
        [_present(w) for w in weights], cell=cell, act=act, norm=norm, post=post, std_mode=std_mode, min_std=min_std,
        eps=eps, update_bias=_UPDATE_BIAS,
    )


def _step_shapes(stoch, action, deter, embed, weights, cell, norm, post):
    b, s = stoch.shape
    d, hd = deter.shape[1], weights[0].shape[0]
    cdt = _cdt(stoch.dtype)
    dt = stoch.dtype
    outs = [((b, d) if cell != 2 else (0,), dt)] + [((b, s), dt)] * 3 + [((b, s) if post else (0,), dt)] * 3
    outs.append(((b,) if post else (0,), cdt))
    saved = [
        ((b, hd), cdt), ((b,) if norm else (0,), cdt), ((b, hd), cdt),
        ((b, 4 * d if cell == 0 else 3 * d) if cell != 2 else (0,), cdt), ((b,) if cell == 1 else (0,), cdt),
        ((b, hd), cdt), ((b,) if norm else (0,), cdt), ((b, hd), cdt), ((b, 2 * s), cdt),
        ((b, hd) if post else (0,), cdt), ((b,) if post and norm else (0,), cdt), ((b, hd) if post else (0,), cdt),
        ((b, 2 * s) if post else (0,), cdt),
    ]
    return outs + saved


@_step_op.register_fake
def _(stoch, action, deter, embed, noise, prior_noise, seed, weights, cell, act, norm, post, std_mode, min_std, eps):
    return tuple(stoch.new_empty(shape, dtype=dtype)
                 for shape, dtype in _step_shapes(stoch, action, deter, embed, weights, cell, norm, post))


_STEP_BWD_SCHEMA = (
    "(Tensor stoch, Tensor action, Tensor deter, Tensor? embed, Tensor? noise, Tensor? prior_noise, Tensor? seed, "
    "Tensor[] weights, Tensor[] saved, Tensor[] grads, int cell, int act, bool norm, bool post, int std_mode, "
    "float min_std) -> (" + ", ".join(["Tensor"] * 16) + ")"
)


@torch.library.custom_op("fastwm::rssm_step_backward", mutates_args=(), schema=_STEP_BWD_SCHEMA)
def _step_backward_op(stoch, action, deter, embed, noise, prior_noise, seed, weights, saved, grads, cell, act, norm,
                      post, std_mode, min_std):
    return _kernels().step_bwd(
        stoch.contiguous(), action.contiguous(), deter.contiguous(), _c(embed), _c(noise), _c(prior_noise), seed,
        [_present(w) for w in weights], tuple(saved), tuple(g.contiguous() for g in grads), cell=cell, act=act, norm=norm,
        post=post, std_mode=std_mode, min_std=min_std, update_bias=_UPDATE_BIAS,
    )


@_step_backward_op.register_fake
def _(stoch, action, deter, embed, noise, prior_noise, seed, weights, saved, grads, cell, act, norm, post, std_mode,
      min_std):
    b, s = stoch.shape
    a_dim, d, hd = action.shape[1], deter.shape[1], weights[0].shape[0]
    e_dim = embed.shape[1] if post and embed is not None else 0
    dh_in = hd if cell == 2 else d
    cdt = _cdt(stoch.dtype)
    shapes = [
        (b, s), (b, a_dim), (b, d) if cell != 2 else (0,), (b, e_dim) if post else (0,),
        (b, hd), (b, hd) if norm else (0,), (b, hd) if cell != 2 else (0,),
        (b, 3 * d) if cell != 2 else (0,), (b, 3 * d) if cell != 2 else (0,), (b, dh_in),
        (b, 2 * s), (b, hd), (b, hd) if norm else (0,),
        (b, 2 * s) if post else (0,), (b, hd) if post else (0,), (b, hd) if post and norm else (0,),
    ]
    return tuple(stoch.new_empty(shape, dtype=cdt) for shape in shapes)


def _step_setup_context(ctx, inputs, output):
    stoch, action, deter, embed, noise, prior_noise, seed, weights, cell, act, norm, post, std_mode, min_std, eps = inputs
    saved = output[_N_OUT:]
    hout = output[0]
    ctx.save_for_backward(stoch, action, deter, embed, noise, prior_noise, seed, hout, *weights, *saved)
    ctx.n_weights = len(weights)
    ctx.config = (cell, act, norm, post, std_mode, min_std)
    ctx.set_materialize_grads(False)


def _wgrad(d_pre: Tensor, *inputs: Tensor, dtype: torch.dtype) -> Tensor:
    """d W = d_pre.T @ cat(inputs) over the batch, computed in d_pre's (compute) dtype."""
    x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=-1)
    return (d_pre.t() @ x.to(d_pre.dtype)).to(dtype)


def _sum_rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.sum(0).to(dtype)


def weight_grads(cell: int, norm: bool, post: bool, weights, saved, stoch: Tensor, action: Tensor, deter: Tensor,
                 embed: Tensor | None, hout: Tensor, d_pre, *, prior_used: bool = True,
                 post_used: bool = True) -> list[Tensor | None]:
    """The weight gradients of the step from the per-row pre-activation gradients ``d_pre`` = (d_xpre, d_xv, d_c1,
    d_c2, d_praw, d_ppre, d_pv, d_qraw, d_qpre, d_qv): one matrix product (or row sum) per parameter over all rows.
    Every tensor is 2-D [rows, width] ([rows] for the saved rstds), rows being B for a step or T x B for observe.

    ``prior_used`` / ``post_used`` False: no gradient reached that head's outputs, so its parameters get None, as
    autograd gives a parameter off the loss's graph on the reference backend (optimizers skip a None gradient but
    not a zero one)."""
    d_xpre, d_xv, d_c1, d_c2, d_praw, d_ppre, d_pv, d_qraw, d_qpre, d_qv = d_pre
    n_w = len(weights)
    (w_in, b_in, nw_in, nb_in, w_c1, w_c2, b_c1, b_c2, nw_c, nb_c, w_p1, b_p1, nw_p1, nb_p1, w_p2, b_p2,
     w_q1, b_q1, nw_q1, nb_q1, w_q2, b_q2) = weights
    x_pre, x_rstd, x_act, c_save, c_rstd, p_pre, p_rstd, p_y, p_raw, q_pre, q_rstd, q_y, q_raw = saved
    b_in, b_c1, b_c2, b_p1, b_q1 = (None if t.numel() == 0 else t for t in (b_in, b_c1, b_c2, b_p1, b_q1))
    wdt = w_in.dtype
    hin = x_act if cell == 2 else hout
    gw: list[Tensor | None] = [None] * n_w
    # input layer
    gw[0] = _wgrad(d_xpre, stoch, action, dtype=wdt)
    if b_in is not None:
        gw[1] = _sum_rows(d_xpre, wdt)
    if norm:
        gw[2], gw[3] = _sum_rows(d_xv * x_pre, wdt), _sum_rows(d_xv, wdt)
    # cell
    if cell == 0:
        gw[4], gw[5] = _wgrad(d_c1, x_act, dtype=wdt), _wgrad(d_c2, deter, dtype=wdt)
        if b_c1 is not None:
            gw[6] = _sum_rows(d_c1, wdt)
        if b_c2 is not None:
            gw[7] = _sum_rows(d_c2, wdt)
    elif cell == 1:
        gw[4] = _wgrad(d_c1, x_act, deter, dtype=wdt)
        gw[8], gw[9] = _sum_rows(d_c2 * c_save, wdt), _sum_rows(d_c2, wdt)
    # prior head
    if prior_used:
        gw[10] = _wgrad(d_ppre, hin, dtype=wdt)
        if b_p1 is not None:
            gw[11] = _sum_rows(d_ppre, wdt)
        if norm:
            gw[12], gw[13] = _sum_rows(d_pv * p_pre, wdt), _sum_rows(d_pv, wdt)
        gw[14], gw[15] = _wgrad(d_praw, p_y, dtype=wdt), _sum_rows(d_praw, wdt)
    # posterior head
    if post and post_used:
        gw[16] = _wgrad(d_qpre, hin, embed, dtype=wdt)
        if b_q1 is not None:
            gw[17] = _sum_rows(d_qpre, wdt)
        if norm:
            gw[18], gw[19] = _sum_rows(d_qv * q_pre, wdt), _sum_rows(d_qv, wdt)
        gw[20], gw[21] = _wgrad(d_qraw, q_y, dtype=wdt), _sum_rows(d_qraw, wdt)
    return gw


# The outputs (of the step op and of the observe op alike) that depend on each head: the prior's sample, mean and std
# and the KL; the posterior's and the KL.
PRIOR_OUTPUTS, POST_OUTPUTS = (1, 2, 3, 7), (4, 5, 6, 7)


def _reached(grads, outputs) -> bool:
    """Whether any of these outputs received a gradient."""
    return any(grads[i] is not None for i in outputs)


def _step_backward(ctx, *grads):
    n_w = ctx.n_weights
    stoch, action, deter, embed, noise, prior_noise, seed, hout, *rest = ctx.saved_tensors
    weights, saved = rest[:n_w], rest[n_w:]
    cell, act, norm, post, std_mode, min_std = ctx.config
    b, s = stoch.shape
    # Upstream grads of the 8 outputs; those that got none are zeros (the kernel reads every one it needs).
    out_shapes = [(b, deter.shape[1]) if cell != 2 else (0,)] + [(b, s)] * 3 + [(b, s) if post else (0,)] * 3
    out_shapes.append((b,) if post else (0,))
    g_list = []
    for i, shape in enumerate(out_shapes):
        g = grads[i]
        if g is None:
            dtype = (torch.float64 if stoch.dtype == torch.float64 else torch.float32) if i == 7 else stoch.dtype
            g = stoch.new_zeros(shape, dtype=dtype)
        g_list.append(g)
    (d_z, d_a, d_h, d_e, d_xpre, d_xv, d_x, d_c1, d_c2, d_hin, d_praw, d_ppre, d_pv, d_qraw, d_qpre,
     d_qv) = _step_backward_op(stoch, action, deter, embed, noise, prior_noise, seed, list(weights), list(saved),
                               g_list, cell, act, norm, post, std_mode, min_std)
    gw = weight_grads(cell, norm, post, weights, saved, stoch, action, deter, embed, hout,
                      (d_xpre, d_xv, d_c1, d_c2, d_praw, d_ppre, d_pv, d_qraw, d_qpre, d_qv),
                      prior_used=_reached(grads, PRIOR_OUTPUTS), post_used=_reached(grads, POST_OUTPUTS))
    dt = stoch.dtype
    return (
        d_z.to(dt), d_a.to(dt), d_h.to(dt) if cell != 2 else None, d_e.to(dt) if post else None,
        None, None, None, gw, None, None, None, None, None, None, None,
    )


_step_op.register_autograd(without_autocast(_step_backward), setup_context=_step_setup_context)


def _seed(noise_given: bool, prior_noise_given: bool, generator, like: Tensor) -> Tensor | None:
    if noise_given and prior_noise_given:
        return None
    device = like.device if generator is None else generator.device
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device, generator=generator).to(like.device)


def _run_step(cfg: reference.StepConfig, w: reference.StepWeights, stoch, action, deter, embed, noise, prior_noise,
              generator, post: bool, seed: Tensor | None = None) -> tuple[Tensor, ...]:
    if seed is None:
        seed = _seed(noise is not None, (prior_noise is not None) or not post, generator, stoch)
    # Absent weights travel as empty tensors (a Tensor[] argument takes no None).
    weights = [stoch.new_empty(0) if t is None else t for t in w]
    return _step_op(stoch, action, deter, embed, noise, prior_noise, seed, weights, _CELL_IDS[cfg.cell],
                    _ACT_IDS[cfg.act], bool(cfg.norm), post, _STD_IDS[cfg.std_mode], float(cfg.min_std),
                    float(cfg.eps))


def fused_prior_step(cfg, w, stoch, action, deter, noise, generator, seed=None):
    """The prior step as one fused launch -> (deter', z, mean, std); deter' is ``deter`` itself for cell "none".
    ``seed``: the int64 seeds [2] to draw with (the sample uses seed[0]) instead of drawing them from ``generator``."""
    out = _run_step(cfg, w, stoch, action, deter, None, noise, None, generator, post=False, seed=seed)
    hout = out[0] if cfg.cell != "none" else deter
    return hout, out[1], out[2], out[3]


def fused_posterior_step(cfg, w, stoch, action, deter, embed, noise, prior_noise, generator):
    """The posterior step as one fused launch -> (deter', post z, mean, std, prior z, mean, std, kl)."""
    out = _run_step(cfg, w, stoch, action, deter, embed, noise, prior_noise, generator, post=True)
    hout = out[0] if cfg.cell != "none" else deter
    return (hout, out[4], out[5], out[6], out[1], out[2], out[3], out[7])


# ----------------------------------------------------------------------------------------------------------------------
# The functional cells
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastwm::gru_cell", mutates_args=())
def _gru_op(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
            b_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    return _kernels().gru_cell_fwd(x.contiguous(), h.contiguous(), w_ih.contiguous(), w_hh.contiguous(), _c(b_ih),
                                   _c(b_hh))


@_gru_op.register_fake
def _(x, h, w_ih, w_hh, b_ih, b_hh):
    b, d = h.shape
    return x.new_empty((b, d)), x.new_empty((b, 4 * d), dtype=_cdt(x.dtype))


@torch.library.custom_op("fastwm::gru_cell_backward", mutates_args=())
def _gru_backward_op(g: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
                     save: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kernels().gru_cell_bwd(g.contiguous(), h.contiguous(), w_ih.contiguous(), w_hh.contiguous(), save)


@_gru_backward_op.register_fake
def _(g, h, w_ih, w_hh, save):
    b, d = h.shape
    cdt = _cdt(h.dtype)
    return (h.new_empty((b, 3 * d), dtype=cdt), h.new_empty((b, 3 * d), dtype=cdt),
            h.new_empty((b, w_ih.shape[1]), dtype=cdt), h.new_empty((b, d), dtype=cdt))


def _gru_setup_context(ctx, inputs, output):
    x, h, w_ih, w_hh, b_ih, b_hh = inputs
    ctx.save_for_backward(x, h, w_ih, w_hh, output[1])
    ctx.has_bias = (b_ih is not None, b_hh is not None)
    ctx.set_materialize_grads(False)


def _gru_backward(ctx, g, _g_save):
    x, h, w_ih, w_hh, save = ctx.saved_tensors
    if g is None:
        return None, None, None, None, None, None
    dgi, dgh, dx, dh = _gru_backward_op(g, h, w_ih, w_hh, save)
    wdt = w_ih.dtype
    return (dx.to(x.dtype), dh.to(h.dtype), _wgrad(dgi, x, dtype=wdt), _wgrad(dgh, h, dtype=wdt),
            _sum_rows(dgi, wdt) if ctx.has_bias[0] else None, _sum_rows(dgh, wdt) if ctx.has_bias[1] else None)


_gru_op.register_autograd(without_autocast(_gru_backward), setup_context=_gru_setup_context)


@torch.library.custom_op("fastwm::layernorm_gru_cell", mutates_args=())
def _lngru_op(x: Tensor, h: Tensor, w: Tensor, nw: Tensor, nb: Tensor, eps: float,
              update_bias: float) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().lngru_cell_fwd(x.contiguous(), h.contiguous(), w.contiguous(), nw.contiguous(),
                                     nb.contiguous(), eps=eps, update_bias=update_bias)


@_lngru_op.register_fake
def _(x, h, w, nw, nb, eps, update_bias):
    b, d = h.shape
    cdt = _cdt(x.dtype)
    return x.new_empty((b, d)), x.new_empty((b, 3 * d), dtype=cdt), x.new_empty((b,), dtype=cdt)


@torch.library.custom_op("fastwm::layernorm_gru_cell_backward", mutates_args=())
def _lngru_backward_op(g: Tensor, h: Tensor, w: Tensor, nw: Tensor, nb: Tensor, xhat: Tensor, rstd: Tensor,
                       update_bias: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kernels().lngru_cell_bwd(g.contiguous(), h.contiguous(), w.contiguous(), nw.contiguous(),
                                     nb.contiguous(), xhat, rstd, update_bias=update_bias)


@_lngru_backward_op.register_fake
def _(g, h, w, nw, nb, xhat, rstd, update_bias):
    b, d = h.shape
    cdt = _cdt(h.dtype)
    return (h.new_empty((b, 3 * d), dtype=cdt), h.new_empty((b, 3 * d), dtype=cdt),
            h.new_empty((b, w.shape[1] - d), dtype=cdt), h.new_empty((b, d), dtype=cdt))


def _lngru_setup_context(ctx, inputs, output):
    x, h, w, nw, nb, eps, update_bias = inputs
    ctx.save_for_backward(x, h, w, nw, nb, output[1], output[2])
    ctx.update_bias = update_bias
    ctx.set_materialize_grads(False)


def _lngru_backward(ctx, g, _g_xhat, _g_rstd):
    x, h, w, nw, nb, xhat, rstd = ctx.saved_tensors
    if g is None:
        return None, None, None, None, None, None, None
    dpv, dparts, dx, dh = _lngru_backward_op(g, h, w, nw, nb, xhat, rstd, ctx.update_bias)
    wdt = w.dtype
    return (dx.to(x.dtype), dh.to(h.dtype), _wgrad(dparts, x, h, dtype=wdt), _sum_rows(dpv * xhat, wdt),
            _sum_rows(dpv, wdt), None, None)


_lngru_op.register_autograd(without_autocast(_lngru_backward), setup_context=_lngru_setup_context)


def fused_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh) -> Tensor:
    return _gru_op(x, h, w_ih, w_hh, b_ih, b_hh)[0]


def fused_layernorm_gru_cell(x, h, w, nw, nb, eps, update_bias) -> Tensor:
    return _lngru_op(x, h, w, nw, nb, eps, update_bias)[0]
