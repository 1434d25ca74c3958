"""The sequence ELBO of a latent world model: reconstruction, policy and KL terms, under any KL convention.

For a sequence of T steps with posterior q(z_t | h_t, o_t) and prior p(z_t | h_t) (h_t summarising z_<t, a_<t)::

    ELBO = sum_t E_q[ log p(o_t | z_t) + log pi(a_t | z_t) - KL(q(z_t | .) || p(z_t | z_{t-1}, a_{t-1})) ]

:func:`sequence_elbo` returns this per step: every term is a mean over the B sequences and T steps, that is, the sum
over t divided by T, averaged over the batch (the scale PlaNet and Dreamer train on). The KL term is
:func:`fastwm.kl_loss` under the chosen convention (free nats, balancing, dyn/rep scales), times ``kl_scale``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from ._amp import ELIGIBLE, autocast_on
from ._validation import check_tensor, check_values
from .gaussian import gaussian_kl
from .kl import KL_MODES, KL_PRESETS, _check_scalar, kl_loss

__all__ = ["ELBOTerms", "SequenceELBO", "gaussian_log_prob", "sequence_elbo"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class GaussianParams(Protocol):
    """Anything with ``mean`` and ``std`` tensors [B, T, S], such as the :class:`fastwm.State` objects that
    :meth:`fastwm.RSSM.observe` returns."""

    @property
    def mean(self) -> Tensor: ...

    @property
    def std(self) -> Tensor: ...


class ELBOTerms(NamedTuple):
    """The terms of the sequence ELBO, each a scalar tensor, per step (mean over the B x T steps; see
    :func:`sequence_elbo`).

    - ``elbo``: recon + policy - kl, the training objective to maximise.
    - ``loss``: -elbo, to minimise (``terms.loss.backward()``).
    - ``recon``: mean of log p(o_t | z_t).
    - ``policy``: mean of log pi(a_t | z_t); a zero tensor when no policy log-likelihood was given.
    - ``kl``: the KL term under the chosen convention (free nats, balancing or dyn/rep scales applied) times
      ``kl_scale``: exactly ``kl_scale * fastwm.kl_loss(...)``.
    - ``kl_raw``: mean of KL(q_t || p_t) without free nats, scales or balancing; detached (for logging: free nats hide
      the actual KL once it falls below the floor). recon + policy - kl_raw is the unmodified ELBO per step.
    """

    elbo: Tensor
    loss: Tensor
    recon: Tensor
    policy: Tensor
    kl: Tensor
    kl_raw: Tensor


# ----------------------------------------------------------------------------------------------------------------------
# Argument handling
# ----------------------------------------------------------------------------------------------------------------------

_MODE_ONLY = {"alpha": ("balance",), "dyn_scale": ("dyn_rep",), "rep_scale": ("dyn_rep",)}


def _kl_settings(
    kl_mode: str | None,
    preset: str | None,
    free_nats: float | None,
    alpha: float | None,
    dyn_scale: float | None,
    rep_scale: float | None,
    free_avg: bool | None,
) -> dict[str, Any]:
    """The keyword arguments of :func:`fastwm.kl_loss`: the preset's settings, overridden by the given ones."""
    if preset is not None:
        if kl_mode is not None:
            raise ValueError(f"give kl_mode or preset, not both (got kl_mode {kl_mode!r} and preset {preset!r})")
        if not isinstance(preset, str) or preset not in KL_PRESETS:
            raise ValueError(f"preset must be one of {tuple(sorted(KL_PRESETS))}, got {preset!r}")
        settings = dict(KL_PRESETS[preset])
    else:
        mode = "per_step" if kl_mode is None else kl_mode
        if mode not in KL_MODES:
            raise ValueError(f"kl_mode must be one of {KL_MODES}, got {mode!r}")
        settings = {"mode": mode}
    mode = settings["mode"]
    given = {"free_nats": free_nats, "alpha": alpha, "dyn_scale": dyn_scale, "rep_scale": rep_scale}
    for name, value in given.items():
        if value is None:
            continue
        if name in _MODE_ONLY and mode not in _MODE_ONLY[name]:
            raise ValueError(f"{name} applies to kl_mode {_MODE_ONLY[name][0]!r} only, got kl_mode {mode!r}")
        settings[name] = _check_scalar(name, value, high=1.0 if name == "alpha" else float("inf"))
    if free_avg is not None:
        if mode not in ("balance", "dyn_rep"):
            raise ValueError(f"free_avg applies to kl_mode 'balance' and 'dyn_rep' only, got kl_mode {mode!r}")
        if not isinstance(free_avg, bool):
            raise TypeError(f"free_avg must be a bool or None, got {type(free_avg).__name__}")
        settings["free_avg"] = free_avg
    if "free_nats" in settings:
        _check_scalar("free_nats", settings["free_nats"])
    return settings


def _gaussian_fields(name: str, dist: object) -> tuple[Tensor, Tensor]:
    if not (hasattr(dist, "mean") and hasattr(dist, "std")):
        raise TypeError(f"{name} must have .mean and .std tensors [B, T, S] (a fastwm.State from RSSM.observe), "
                        f"got {type(dist).__name__}")
    mean, std = dist.mean, dist.std  # type: ignore[attr-defined]
    check_tensor(f"{name}.mean", mean, min_dim=2)
    check_tensor(f"{name}.std", std, min_dim=2)
    return mean, std


def _check_lead(name: str, t: object, lead: tuple[int, ...], device: torch.device, hint: str = "") -> Tensor:
    """A floating tensor of shape ``lead`` (the [B, T] of post.mean) on ``device``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(lead)} [B, T], got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != lead:
        raise ValueError(f"{name} must have shape {list(lead)} ([B, T] of post.mean [B, T, S]), got "
                         f"{list(t.shape)}{hint}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of post.mean ({device}), got {t.device}")
    return t


def _acc(t: Tensor) -> Tensor:
    """float32 at least, float64 kept: means over B x T in half precision lose too much."""
    return t if t.dtype == torch.float64 else t.float()


# ----------------------------------------------------------------------------------------------------------------------
# The ELBO
# ----------------------------------------------------------------------------------------------------------------------


def sequence_elbo(
    recon_log_prob: Tensor,
    post: GaussianParams,
    prior: GaussianParams,
    *,
    policy_log_prob: Tensor | None = None,
    kl_mode: str | None = None,
    preset: str | None = None,
    free_nats: float | None = None,
    kl_scale: float = 1.0,
    alpha: float | None = None,
    dyn_scale: float | None = None,
    rep_scale: float | None = None,
    free_avg: bool | None = None,
    mask: Tensor | None = None,
) -> ELBOTerms:
    """The sequence ELBO per step, and each of its terms.

    With N = B * T steps (or the steps ``mask`` selects) and KL_bt = KL(q_bt || p_bt) summed over the S latent dims::

        recon  = (1 / N) sum_{b,t} recon_log_prob[b, t]                      log p(o_t | z_t)
        policy = (1 / N) sum_{b,t} policy_log_prob[b, t]   (0 when None)     log pi(a_t | z_t)
        kl     = kl_scale * kl_loss(post.mean, post.std, prior.mean, prior.std, **settings)
        elbo   = recon + policy - kl;   loss = -elbo

    This is the sequence ELBO sum_t [log p(o_t | z_t) + log pi(a_t | z_t) - KL_t] divided by T and averaged over the
    B sequences (PlaNet's and Dreamer's scale: sum over observation and latent dims, mean over batch and time). To
    get the sum over t (averaged over the batch), multiply any term by T: ``T * terms.elbo`` (with a mask,
    ``terms.elbo * mask.sum() / B``, the sum over the selected steps); a free-nats floor then reads T * free_nats.

    With ``free_nats`` > 0 or any balancing / dyn-rep scales, ``elbo`` is the training objective rather than the bound
    itself; ``kl_raw`` holds the plain mean KL, so ``recon + policy - kl_raw`` is the unmodified ELBO per step.

    Args:
        recon_log_prob: [B, T] log p(o_t | z_t), already summed over the observation dims (for example by
            :func:`gaussian_log_prob` with ``event_dims=3`` for images), z_t drawn from the posterior.
        post: the posterior q(z_t | h_t, o_t): a :class:`fastwm.State` (or anything with ``.mean`` and ``.std``)
            with [B, T, S] fields, as :meth:`fastwm.RSSM.observe` returns.
        prior: the prior p(z_t | h_t), same shapes, dtype and device as ``post``.
        policy_log_prob: [B, T] log pi(a_t | z_t), optional.
        kl_mode: a :data:`fastwm.KL_MODES` name ("per_step", "mean", "shifted", "balance", "dyn_rep"); default
            "per_step". Not together with ``preset``.
        preset: a :data:`fastwm.KL_PRESETS` name ("dreamerv3", "dreamerv2", "dreamer_v1", "planet", "torchrl", ...):
            that project's KL settings. ``free_nats``, ``alpha``, ``dyn_scale``, ``rep_scale`` and ``free_avg``
            override the preset's values when given.
        free_nats: the free-nats floor; None: the preset's, else :func:`fastwm.kl_loss`'s default for the mode
            (3.0 for per_step / mean / shifted, 0.0 for balance, 1.0 for dyn_rep). 0.0 gives the plain KL.
        kl_scale: the weight of the KL term (beta; Dreamer's ``kl_scale``), a finite float >= 0.
        alpha: kl_mode "balance" only: the weight of KL(sg(q) || p) (default 0.8).
        dyn_scale, rep_scale: kl_mode "dyn_rep" only: the weights of KL(sg(q) || p) and KL(q || sg(p))
            (defaults 0.5 and 0.1, dreamerv3-torch's; the preset "dreamerv3" has 1.0 and 0.1).
        free_avg: kl_mode "balance" / "dyn_rep" only: apply the floor after the mean (True) or per step (False).
        mask: [B, T] bool, True for the steps that count (padding and steps past an episode's end False); every term
            then averages over the selected steps only, and the KL convention sees only those (as TorchRL's masked
            loss does). Selecting them copies a data-dependent number of rows, which syncs with the host: leave it
            None inside CUDA graphs.

    Returns:
        :class:`ELBOTerms` ``(elbo, loss, recon, policy, kl, kl_raw)``, scalar tensors in float32 (float64 when an
        input is float64). Gradients flow into ``recon_log_prob``, ``policy_log_prob`` and the posterior and prior
        means and stds, the KL part exactly as the convention's stop-gradients route it (``kl_raw`` has none).

    Example::

        post, prior = rssm.observe(embed, action, is_first)                   # [B, T, ...] fields
        feat = rssm.features(post)
        recon = fastwm.gaussian_log_prob(obs, decoder(feat), event_dims=3)    # [B, T]
        terms = fastwm.sequence_elbo(recon, post, prior, preset="dreamerv3")
        terms.loss.backward()
    """
    settings = _kl_settings(kl_mode, preset, free_nats, alpha, dyn_scale, rep_scale, free_avg)
    scale = _check_scalar("kl_scale", kl_scale)
    q_mean, q_std = _gaussian_fields("post", post)
    p_mean, p_std = _gaussian_fields("prior", prior)
    for name, t in (("post.std", q_std), ("prior.mean", p_mean), ("prior.std", p_std)):
        if tuple(t.shape) != tuple(q_mean.shape):
            raise ValueError(f"{name} must have the shape of post.mean {list(q_mean.shape)} [B, T, S], got "
                             f"{list(t.shape)}")
        if t.dtype != q_mean.dtype:
            raise TypeError(f"{name} must have the dtype of post.mean ({q_mean.dtype}), got {t.dtype}")
        if t.device != q_mean.device:
            raise ValueError(f"{name} must be on the device of post.mean ({q_mean.device}), got {t.device}")
    lead, device = tuple(q_mean.shape[:-1]), q_mean.device
    _check_lead("recon_log_prob", recon_log_prob, lead, device,
                hint=" (sum the log-likelihood over the observation dims first, e.g. gaussian_log_prob(..., "
                     "event_dims=3) for images)")
    if policy_log_prob is not None:
        _check_lead("policy_log_prob", policy_log_prob, lead, device,
                    hint=" (sum the log-likelihood over the action dims first)")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor [B, T], got {got}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have shape {list(lead)} ([B, T] of post.mean [B, T, S]), got "
                             f"{list(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask must be on the device of post.mean ({device}), got {mask.device}")
    finite = {"recon_log_prob": recon_log_prob}
    if policy_log_prob is not None:
        finite["policy_log_prob"] = policy_log_prob
    check_values(finite)

    if mask is not None:
        recon_log_prob = recon_log_prob[mask]
        policy_log_prob = None if policy_log_prob is None else policy_log_prob[mask]
        q_mean, q_std, p_mean, p_std = (t[mask] for t in (q_mean, q_std, p_mean, p_std))
        if recon_log_prob.shape[0] == 0:
            raise ValueError("mask must select at least one step, got an all-False mask")

    recon = _acc(recon_log_prob).mean()
    kl = kl_loss(q_mean, q_std, p_mean, p_std, **settings)
    if scale != 1.0:
        kl = kl * scale
    with torch.no_grad():
        kl_raw = gaussian_kl(q_mean.detach(), q_std.detach(), p_mean.detach(), p_std.detach()).mean()
    if policy_log_prob is None:
        policy = torch.zeros_like(recon, requires_grad=False)
    else:
        policy = _acc(policy_log_prob).mean()
    elbo = recon + policy - kl
    dtype = elbo.dtype
    return ELBOTerms(elbo, -elbo, recon.to(dtype), policy.to(dtype), kl.to(dtype), kl_raw.to(dtype))


class SequenceELBO(nn.Module):
    """:func:`sequence_elbo` with its KL settings fixed at construction (validated there), as a module.

    Args:
        kl_mode, preset, free_nats, kl_scale, alpha, dyn_scale, rep_scale, free_avg: as in :func:`sequence_elbo`.

    Calling it: ``elbo(recon_log_prob, post, prior, policy_log_prob=None, mask=None)`` -> :class:`ELBOTerms`.

    Example::

        elbo = fastwm.SequenceELBO(preset="dreamerv2", kl_scale=0.1)
        terms = elbo(recon, post, prior)
        terms.loss.backward()
    """

    def __init__(
        self,
        *,
        kl_mode: str | None = None,
        preset: str | None = None,
        free_nats: float | None = None,
        kl_scale: float = 1.0,
        alpha: float | None = None,
        dyn_scale: float | None = None,
        rep_scale: float | None = None,
        free_avg: bool | None = None,
    ) -> None:
        super().__init__()
        self.kl_mode, self.preset, self.free_nats, self.alpha = kl_mode, preset, free_nats, alpha
        self.dyn_scale, self.rep_scale, self.free_avg = dyn_scale, rep_scale, free_avg
        self.kl_scale = _check_scalar("kl_scale", kl_scale)
        # Validate now, not at the first call; the resolved kl_loss settings, for inspection.
        self.kl_settings: dict[str, Any] = _kl_settings(kl_mode, preset, free_nats, alpha, dyn_scale, rep_scale,
                                                        free_avg)

    def forward(
        self,
        recon_log_prob: Tensor,
        post: GaussianParams,
        prior: GaussianParams,
        policy_log_prob: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> ELBOTerms:
        """See :func:`sequence_elbo`: recon_log_prob and policy_log_prob [B, T], post and prior [B, T, S] fields,
        mask [B, T] bool."""
        return sequence_elbo(
            recon_log_prob, post, prior, policy_log_prob=policy_log_prob, kl_mode=self.kl_mode, preset=self.preset,
            free_nats=self.free_nats, kl_scale=self.kl_scale, alpha=self.alpha, dyn_scale=self.dyn_scale,
            rep_scale=self.rep_scale, free_avg=self.free_avg, mask=mask,
        )

    def extra_repr(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.kl_settings.items())
        head = f"preset={self.preset!r}, " if self.preset is not None else ""
        return f"{head}{settings}, kl_scale={self.kl_scale}"


# ----------------------------------------------------------------------------------------------------------------------
# Decoder log-likelihoods
# ----------------------------------------------------------------------------------------------------------------------


def _autocast_mix(x: Tensor, other: Tensor) -> bool:
    """float32 / float16 / bfloat16 mixed inside an autocast region for x's device type (computed in float32)."""
    return x.dtype in ELIGIBLE and other.dtype in ELIGIBLE and autocast_on(x.device)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: float | Tensor = 1.0, *, event_dims: int = 1) -> Tensor:
    """log N(x; mean, std^2), summed over the last ``event_dims`` dims: the log-likelihood of a Gaussian decoder.

    Per element: -0.5 * ((x - mean) / std)^2 - log(std) - 0.5 * log(2 pi). The constant is included, as in
    ``torch.distributions.Normal(mean, std).log_prob(x)`` and TensorFlow Probability's: Dreamer V1 and V2 (TF) and
    google-research/planet use ``tfd.Independent(tfd.Normal(mean, 1), 3)`` for images, that is
    ``gaussian_log_prob(obs, mean, 1.0, event_dims=3)``. Kaixhin's PlaNet and TorchRL's Dreamer instead minimise the
    summed squared error (no 0.5, no constant) and dreamerv3-torch / DreamerV3 use -sum of squared errors as the
    log-likelihood ("MSEDist"): the same gradient direction with twice the scale, so pass
    ``-((obs - mean) ** 2).sum(dims)`` as ``recon_log_prob`` to reproduce those exactly.

    Args:
        x: [..., *event] the observation.
        mean: the decoder's mean, the shape, dtype and device of ``x`` (inside an autocast region, float32 and the
            half dtypes mix: a decoder under autocast returns its mean in half precision).
        std: a positive float (1.0: the unit-variance decoder of PlaNet and Dreamer) or a tensor of stds
            broadcastable to ``x``'s shape, same dtype and device.
        event_dims: how many trailing dims form one observation (1 for vectors, 3 for [C, H, W] images, 0 for none).

    Returns:
        [...] (``x``'s shape without the last ``event_dims`` dims) in float32 (float64 for float64 inputs), computed in
        float32 at least: a sum over 12,288 pixels in half precision would lose most of its digits.
    """
    check_tensor("x", x, min_dim=0)
    check_tensor("mean", mean, min_dim=0)
    if tuple(mean.shape) != tuple(x.shape):
        raise ValueError(f"mean must have the shape of x {list(x.shape)}, got {list(mean.shape)}")
    if mean.dtype != x.dtype and not _autocast_mix(x, mean):
        raise TypeError(f"mean must have the dtype of x ({x.dtype}), got {mean.dtype}")
    if mean.device != x.device:
        raise ValueError(f"mean must be on the device of x ({x.device}), got {mean.device}")
    if isinstance(event_dims, bool) or not isinstance(event_dims, int) or not 0 <= event_dims <= x.dim():
        raise ValueError(f"event_dims must be an int in [0, x.dim() = {x.dim()}], got {event_dims!r}")
    diff = _acc(x) - _acc(mean)
    if isinstance(std, Tensor):
        check_tensor("std", std, min_dim=0)
        if std.dtype != x.dtype and not _autocast_mix(x, std):
            raise TypeError(f"std must have the dtype of x ({x.dtype}), got {std.dtype}")
        if std.device != x.device:
            raise ValueError(f"std must be on the device of x ({x.device}), got {std.device}")
        try:
            shape = torch.broadcast_shapes(std.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(f"std must broadcast to the shape of x {list(x.shape)}, got {list(std.shape)}")
        check_values({"x": x, "mean": mean, "std": std}, {"std": std})
        s = _acc(std)
        log_p = -0.5 * (diff / s).square() - s.log() - _HALF_LOG_2PI
    else:
        std = _check_scalar("std", std)
        if std <= 0.0:
            raise ValueError(f"std must be > 0, got {std}")
        check_values({"x": x, "mean": mean})
        z = diff if std == 1.0 else diff / std
        log_p = -0.5 * z.square() - (math.log(std) + _HALF_LOG_2PI)
    if event_dims == 0:
        return log_p
    return log_p.sum(dim=tuple(range(-event_dims, 0)))
