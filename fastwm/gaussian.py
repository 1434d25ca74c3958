"""Gaussian latents: std transform, reparameterized sample and per-step KL, fused.

The public functions dispatch on the active backend (:mod:`fastwm._backend`): the Triton kernels of
``fastwm.kernels.gaussian`` through the ``fastwm::`` custom ops registered below (so ``torch.compile(fullgraph=True)``
traces through them), or the eager reference of :mod:`fastwm.reference`.

Dtypes: float64 inputs compute in float64; float32, bfloat16 and float16 compute in float32 and store in the input
dtype. KL always comes back in float32 (float64 for float64 inputs), whatever the input dtype.

Noise: with ``noise=None`` the kernels draw standard normals in registers from a Philox seed taken from ``generator``
(or the device's default generator) and regenerate them in backward instead of storing them
(:func:`fastwm.reference.philox_normal` computes the same numbers in PyTorch, for tests). The reference backend draws
its noise with ``torch.randn`` from the same generator: reproducible too, and about 20x cheaper on a CPU than Philox
written in PyTorch, but not the kernels' numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import reference
from ._amp import without_autocast
from ._backend import use_triton
from ._validation import check_float, check_generator, check_like, check_tensor, check_values

__all__ = [
    "GaussianHeadSample",
    "std_from_raw",
    "gaussian_rsample",
    "gaussian_kl",
    "gaussian_sample_kl",
    "gaussian_head_sample_kl",
]

_STD_MODE_IDS = {name: i for i, name in enumerate(reference.STD_MODES)}  # the kernels' STD_MODE constexpr
_NO_TRANSFORM = -1  # std_mode of the fused op when the inputs are already (mean, std)


def _kernels():
    # Imported on first use: importing triton's kernels never happens at fastwm import time, and TRITON_INTERPRET is
    # read by triton.jit when the kernels module is first imported.
    from .kernels import gaussian as kernels

    return kernels


def _rows(t: Tensor, s: int) -> Tensor:
    return t.reshape(-1, s).contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops: std_from_raw
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastwm::std_from_raw", mutates_args=())
def _std_from_raw_op(raw: Tensor, min_std: float, std_mode: int) -> Tensor:
    return _kernels().std_fwd(raw.contiguous(), std_mode=std_mode, min_std=min_std).view(raw.shape)


@_std_from_raw_op.register_fake
def _(raw: Tensor, min_std: float, std_mode: int) -> Tensor:
    return torch.empty_like(raw, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastwm::std_from_raw_backward", mutates_args=())
def _std_from_raw_backward_op(grad: Tensor, raw: Tensor, min_std: float, std_mode: int) -> Tensor:
    return _kernels().std_bwd(grad.contiguous(), raw.contiguous(), std_mode=std_mode, min_std=min_std).view(raw.shape)


@_std_from_raw_backward_op.register_fake
def _(grad: Tensor, raw: Tensor, min_std: float, std_mode: int) -> Tensor:
    return torch.empty_like(raw, memory_format=torch.contiguous_format)


def _std_setup_context(ctx, inputs, output):
    raw, min_std, std_mode = inputs
    ctx.save_for_backward(raw)
    ctx.min_std, ctx.std_mode = min_std, std_mode


def _std_backward(ctx, grad):
    (raw,) = ctx.saved_tensors
    return _std_from_raw_backward_op(grad, raw, ctx.min_std, ctx.std_mode), None, None


_std_from_raw_op.register_autograd(without_autocast(_std_backward), setup_context=_std_setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops: the fused Gaussian forward / backward
#
# Two input forms, chosen by std_mode:
#   std_mode == -1: q_mean, q_std, p_mean, p_std are [..., S] means and stds;
#   std_mode >= 0 : q_mean, p_mean are raw head outputs [..., 2S] (mean first), q_std and p_std are None, and the
#                   outputs include the four means and stds (the raw gradient then comes back whole, in one tensor).
# Outputs a configuration does not produce are empty tensors.
# ----------------------------------------------------------------------------------------------------------------------


def _fused_shapes(q_mean: Tensor, std_mode: int) -> tuple[tuple[int, ...], int]:
    s = q_mean.shape[-1] // 2 if std_mode >= 0 else q_mean.shape[-1]
    return tuple(q_mean.shape[:-1]), s


def _split_q(t: Tensor, t_std: Tensor | None, s: int, std_mode: int) -> tuple[Tensor, Tensor]:
    """2-D [N, S] (mean, std-or-raw) views of one distribution's inputs."""
    if std_mode >= 0:
        rows = t.reshape(-1, 2 * s).contiguous()
        return rows[:, :s], rows[:, s:]
    assert t_std is not None
    return _rows(t, s), _rows(t_std, s)


@torch.library.custom_op("fastwm::gaussian_fused", mutates_args=())
def _gaussian_fused_op(
    q_mean: Tensor,
    q_std: Tensor | None,
    p_mean: Tensor | None,
    p_std: Tensor | None,
    noise: Tensor | None,
    seed: Tensor | None,
    std_mode: int,
    min_std: float,
    sample: bool,
    kl: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    lead, s = _fused_shapes(q_mean, std_mode)
    qm, qs = _split_q(q_mean, q_std, s, std_mode)
    pm, ps = _split_q(p_mean, p_std, s, std_mode) if kl else (None, None)
    eps = _rows(noise, s) if (sample and noise is not None) else None
    outs = _kernels().gaussian_fwd(
        qm, qs, pm, ps, eps, seed, std_mode=std_mode, min_std=min_std, sample=sample, kl=kl
    )
    z, kl_out, *stats = outs
    shape = (*lead, s)
    return (
        z.view(shape) if sample else z,
        kl_out.view(lead) if kl else kl_out,
        *(t.view(shape) if t.dim() == 2 else t for t in stats),  # 1-D placeholders stay empty
    )


@_gaussian_fused_op.register_fake
def _(q_mean, q_std, p_mean, p_std, noise, seed, std_mode, min_std, sample, kl):
    lead, s = _fused_shapes(q_mean, std_mode)
    shape = (*lead, s)
    kl_dtype = torch.float64 if q_mean.dtype == torch.float64 else torch.float32
    raw = std_mode >= 0

    def out(wanted: bool, out_shape: tuple[int, ...], dtype: torch.dtype = q_mean.dtype) -> Tensor:
        return q_mean.new_empty(out_shape if wanted else (0,), dtype=dtype)

    return (
        out(sample, shape), out(kl, lead, kl_dtype), out(raw, shape), out(raw, shape),
        out(raw and kl, shape), out(raw and kl, shape),
    )


@torch.library.custom_op("fastwm::gaussian_fused_backward", mutates_args=())
def _gaussian_fused_backward_op(
    g_z: Tensor | None,
    g_kl: Tensor | None,
    g_qm: Tensor | None,
    g_qs: Tensor | None,
    g_pm: Tensor | None,
    g_ps: Tensor | None,
    q_mean: Tensor,
    q_std: Tensor | None,
    p_mean: Tensor | None,
    p_std: Tensor | None,
    noise: Tensor | None,
    seed: Tensor | None,
    std_mode: int,
    min_std: float,
    sample: bool,
    kl: bool,
    noise_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    lead, s = _fused_shapes(q_mean, std_mode)
    raw = std_mode >= 0
    qm, qs = _split_q(q_mean, q_std, s, std_mode)
    pm, ps = _split_q(p_mean, p_std, s, std_mode) if kl else (None, None)
    eps = _rows(noise, s) if (sample and noise is not None) else None
    # Gradient buffers: one [N, 2S] tensor per raw input, or one [N, S] tensor per mean / std.
    alloc = _kernels().empty
    n_rows = qm.shape[0]
    d_p = None
    if raw:
        d_q = alloc((n_rows, 2 * s), like=q_mean)
        d_qm, d_qs = d_q[:, :s], d_q[:, s:]
        d_p = alloc((n_rows, 2 * s), like=q_mean) if kl else None
        d_pm, d_ps = (d_p[:, :s], d_p[:, s:]) if d_p is not None else (None, None)
    else:
        # rsample alone: d mean is g_z itself, returned by the autograd formula without a copy
        d_qm = alloc((n_rows, s), like=q_mean) if kl else None
        d_qs = alloc((n_rows, s), like=q_mean)
        d_pm = alloc((n_rows, s), like=q_mean) if kl else None
        d_ps = alloc((n_rows, s), like=q_mean) if kl else None
    d_noise = alloc((n_rows, s), like=q_mean) if (sample and noise_grad) else None
    grads = (
        _rows(g_z, s) if (sample and g_z is not None) else None,
        g_kl.reshape(-1).contiguous() if (kl and g_kl is not None) else None,
        *(_rows(g, s) if (raw and g is not None) else None for g in (g_qm, g_qs)),
        *(_rows(g, s) if (raw and kl and g is not None) else None for g in (g_pm, g_ps)),
    )
    _kernels().gaussian_bwd(
        qm, qs, pm, ps, eps, seed, grads, d_qm, d_qs, d_pm, d_ps, d_noise,
        std_mode=std_mode, min_std=min_std, sample=sample, kl=kl,
    )
    shape = (*lead, s)

    def ret(t: Tensor | None, out_shape: tuple[int, ...]) -> Tensor:
        # Gradients not produced come back as distinct empty tensors (custom-op outputs may not alias).
        return q_mean.new_empty(0) if t is None else t.view(out_shape)

    if raw:
        return ret(d_q, tuple(q_mean.shape)), ret(None, ()), ret(d_p, tuple(q_mean.shape)), ret(None, ()), ret(
            d_noise, shape
        )
    return ret(d_qm, shape), ret(d_qs, shape), ret(d_pm, shape), ret(d_ps, shape), ret(d_noise, shape)


@_gaussian_fused_backward_op.register_fake
def _(g_z, g_kl, g_qm, g_qs, g_pm, g_ps, q_mean, q_std, p_mean, p_std, noise, seed, std_mode, min_std, sample, kl,
      noise_grad):
    lead, s = _fused_shapes(q_mean, std_mode)
    shape = (*lead, s)

    def out(wanted: bool, out_shape: tuple[int, ...]) -> Tensor:
        return q_mean.new_empty(out_shape if wanted else (0,))

    d_noise = out(sample and noise_grad, shape)
    if std_mode >= 0:
        full = tuple(q_mean.shape)
        return out(True, full), out(False, ()), out(kl, full), out(False, ()), d_noise
    return out(kl, shape), out(True, shape), out(kl, shape), out(kl, shape), d_noise


def _fused_setup_context(ctx, inputs, output):
    q_mean, q_std, p_mean, p_std, noise, seed, std_mode, min_std, sample, kl = inputs
    ctx.save_for_backward(q_mean, q_std, p_mean, p_std, noise, seed)
    ctx.config = (std_mode, min_std, sample, kl)
    # Unused outputs (say the means of a head call) send no gradient instead of a materialised zero tensor.
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, g_z, g_kl, g_qm, g_qs, g_pm, g_ps):
    q_mean, q_std, p_mean, p_std, noise, seed = ctx.saved_tensors
    std_mode, min_std, sample, kl = ctx.config
    needs = ctx.needs_input_grad
    noise_grad = bool(noise is not None and needs[4])
    d_qm, d_qs, d_pm, d_ps, d_noise = _gaussian_fused_backward_op(
        g_z, g_kl, g_qm, g_qs, g_pm, g_ps, q_mean, q_std, p_mean, p_std, noise, seed,
        std_mode, min_std, sample, kl, noise_grad,
    )
    if std_mode < 0 and not kl:
        d_qm = g_z if g_z is not None else torch.zeros_like(q_mean)
    return (
        d_qm,
        d_qs if std_mode < 0 else None,
        d_pm if kl else None,
        d_ps if (kl and std_mode < 0) else None,
        d_noise if noise_grad else None,
        None, None, None, None, None,
    )


_gaussian_fused_op.register_autograd(without_autocast(_fused_backward), setup_context=_fused_setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------------


class GaussianHeadSample(NamedTuple):
    """What :func:`gaussian_head_sample_kl` returns; every field [..., S] except kl [...]."""

    sample: Tensor
    kl: Tensor
    post_mean: Tensor
    post_std: Tensor
    prior_mean: Tensor
    prior_std: Tensor


def _std_mode_id(mode: str) -> int:
    if mode not in _STD_MODE_IDS:
        raise ValueError(f"mode must be one of {tuple(_STD_MODE_IDS)}, got {mode!r}")
    return _STD_MODE_IDS[mode]


def _check_min_std(min_std: float, mode: str) -> float:
    min_std = check_float("min_std", min_std)
    if not min_std >= 0.0 or min_std == float("inf"):
        raise ValueError(f"min_std must be a finite float >= 0, got {min_std}")
    if mode == "softplus_clamp" and min_std == 0.0:
        raise ValueError("min_std must be > 0 with mode 'softplus_clamp' (softplus alone can underflow to a zero std)")
    return float(min_std)


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A one-element int64 seed tensor on ``device``, drawn from ``generator`` (or the device's default generator)."""
    check_generator(generator)
    if generator is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=generator.device, generator=generator)
    return seed.to(device)


def _noise_or_seed(
    noise: Tensor | None,
    generator: torch.Generator | None,
    like: Tensor,
    like_name: str,
    shape: tuple[int, ...],
    triton: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(noise, seed) for a sampling call: the given noise; else a Philox seed for the kernels (triton) or noise drawn
    with torch.randn for the reference."""
    if noise is not None:
        if generator is not None:
            raise ValueError("pass either noise or generator, not both")
        check_like("noise", noise, like_name, like, shape=shape)
        check_values({"noise": noise})
        return noise, None
    check_generator(generator)
    if triton:
        return None, _draw_seed(generator, like.device)
    device = like.device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device), None


def std_from_raw(raw: Tensor, *, min_std: float = 0.1, mode: str = "softplus") -> Tensor:
    """Standard deviation from a raw network output, elementwise.

    Modes (see the README's conventions table):
      - ``"softplus"``: ``softplus(raw) + min_std`` (Dreamer V1, PlaNet);
      - ``"softplus_clamp"``: ``softplus(raw).clamp_min(min_std)`` (TorchRL's NormalParamExtractor);
      - ``"sigmoid2"``: ``2 * sigmoid(raw / 2) + min_std`` (dreamerv3-torch).

    Args:
        raw: any shape, floating.
        min_std: the floor, >= 0 (> 0 for "softplus_clamp").
        mode: one of the three above.

    Returns:
        std, the shape and dtype of ``raw``, computed in fp32 (fp64 for fp64 input).
    """
    check_tensor("raw", raw, min_dim=0)
    mode_id = _std_mode_id(mode)
    min_std = _check_min_std(min_std, mode)
    check_values({"raw": raw})
    if use_triton(raw):
        return _std_from_raw_op(raw, min_std, mode_id)
    return reference.std_from_raw(raw, min_std=min_std, mode=mode)


def gaussian_rsample(
    mean: Tensor, std: Tensor, noise: Tensor | None = None, *, generator: torch.Generator | None = None
) -> Tensor:
    """Reparameterized sample ``z = mean + std * noise``.

    Args:
        mean: [..., S].
        std: [..., S], > 0, same dtype and device as ``mean``.
        noise: [..., S] standard normals, or None to draw them in the kernel from a Philox seed (regenerated in
            backward, never stored).
        generator: the torch.Generator the seed is drawn from when ``noise`` is None (reproducible samples).

    Returns:
        z: [..., S] in ``mean``'s dtype; differentiable with respect to mean, std and a given noise.
    """
    check_tensor("mean", mean)
    check_like("std", std, "mean", mean)
    triton = use_triton(mean)
    noise, seed = _noise_or_seed(noise, generator, mean, "mean", tuple(mean.shape), triton)
    check_values({"mean": mean, "std": std}, {"std": std})
    if triton:
        z, *_ = _gaussian_fused_op(mean, std, None, None, noise, seed, _NO_TRANSFORM, 0.0, True, False)
        return z
    assert noise is not None
    return reference.gaussian_rsample(mean, std, noise)


def gaussian_kl(q_mean: Tensor, q_std: Tensor, p_mean: Tensor, p_std: Tensor) -> Tensor:
    """KL(q || p) between diagonal Gaussians, summed over the last dimension.

    Args:
        q_mean, q_std: [..., S] the posterior q (stds > 0).
        p_mean, p_std: [..., S] the prior p, same shape, dtype and device.

    Returns:
        kl: [...] in float32 (float64 for float64 inputs), whatever the input dtype.
    """
    check_tensor("q_mean", q_mean)
    for name, t in (("q_std", q_std), ("p_mean", p_mean), ("p_std", p_std)):
        check_like(name, t, "q_mean", q_mean)
    check_values({"q_mean": q_mean, "q_std": q_std, "p_mean": p_mean, "p_std": p_std}, {"q_std": q_std, "p_std": p_std})
    if use_triton(q_mean):
        return _gaussian_fused_op(q_mean, q_std, p_mean, p_std, None, None, _NO_TRANSFORM, 0.0, False, True)[1]
    return reference.gaussian_kl(q_mean, q_std, p_mean, p_std)


def gaussian_sample_kl(
    q_mean: Tensor,
    q_std: Tensor,
    p_mean: Tensor,
    p_std: Tensor,
    noise: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The sample of q and KL(q || p), both from one kernel.

    Args:
        q_mean, q_std, p_mean, p_std: [..., S], same shape, dtype and device; stds > 0.
        noise: [..., S] or None (drawn from a Philox seed, see :func:`gaussian_rsample`).
        generator: source of the seed when ``noise`` is None.

    Returns:
        (z [..., S] in the input dtype, kl [...] in float32, float64 for float64 inputs).
    """
    check_tensor("q_mean", q_mean)
    for name, t in (("q_std", q_std), ("p_mean", p_mean), ("p_std", p_std)):
        check_like(name, t, "q_mean", q_mean)
    triton = use_triton(q_mean)
    noise, seed = _noise_or_seed(noise, generator, q_mean, "q_mean", tuple(q_mean.shape), triton)
    check_values({"q_mean": q_mean, "q_std": q_std, "p_mean": p_mean, "p_std": p_std}, {"q_std": q_std, "p_std": p_std})
    if triton:
        z, kl, *_ = _gaussian_fused_op(q_mean, q_std, p_mean, p_std, noise, seed, _NO_TRANSFORM, 0.0, True, True)
        return z, kl
    assert noise is not None
    return reference.gaussian_sample_kl(q_mean, q_std, p_mean, p_std, noise)


def gaussian_head_sample_kl(
    post_raw: Tensor,
    prior_raw: Tensor,
    noise: Tensor | None = None,
    *,
    min_std: float = 0.1,
    mode: str = "softplus",
    generator: torch.Generator | None = None,
) -> GaussianHeadSample:
    """The RSSM step's Gaussian tail in one pass: raw head outputs of posterior and prior -> (sample, KL, means, stds).

    Each raw output is [..., 2S], chunked mean first then the std's raw value (as PlaNet, Dreamer and TorchRL do).

    Args:
        post_raw: [..., 2S] the posterior head's output.
        prior_raw: [..., 2S] the prior head's output, same shape, dtype and device.
        noise: [..., S] standard normals for the posterior sample, or None to draw them from a Philox seed.
        min_std, mode: the std transform (see :func:`std_from_raw`).
        generator: source of the seed when ``noise`` is None.

    Returns:
        :class:`GaussianHeadSample` (sample, kl, post_mean, post_std, prior_mean, prior_std): the posterior sample
        and every mean and std [..., S] in the input dtype, kl = KL(post || prior) [...] in float32 (float64 for
        float64 inputs).
    """
    check_tensor("post_raw", post_raw)
    if post_raw.shape[-1] % 2:
        raise ValueError(f"post_raw's last dimension must be even (mean and raw std, 2S), got {post_raw.shape[-1]}")
    check_like("prior_raw", prior_raw, "post_raw", post_raw)
    mode_id = _std_mode_id(mode)
    min_std = _check_min_std(min_std, mode)
    s = post_raw.shape[-1] // 2
    triton = use_triton(post_raw)
    noise, seed = _noise_or_seed(noise, generator, post_raw, "post_raw", (*post_raw.shape[:-1], s), triton)
    check_values({"post_raw": post_raw, "prior_raw": prior_raw})
    if triton:
        return GaussianHeadSample(*_gaussian_fused_op(post_raw, None, prior_raw, None, noise, seed, mode_id, min_std,
                                                      True, True))
    assert noise is not None
    return GaussianHeadSample(
        *reference.gaussian_head_sample_kl(post_raw, prior_raw, noise, min_std=min_std, mode=mode)
    )
