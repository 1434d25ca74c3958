"""The KL term of the sequence ELBO under every free-nats / balancing convention in use.

KL_bt = KL(q_bt || p_bt) summed over the latent dims, for every (batch, time) element; then, by ``mode``:

=============  =====================================================================  ===============================
mode           loss                                                                   used by
=============  =====================================================================  ===============================
per_step       mean_bt max(KL_bt, free)                                               TorchRL V1, Kaixhin PlaNet
mean           max(mean_bt KL_bt, free)                                               Dreamer V1 (TF), juliusfrost
shifted        mean_bt max(0, KL_bt - free)                                           google-research/planet
balance        alpha * KL(sg(q) || p) + (1 - alpha) * KL(q || sg(p)), free applied    DreamerV2, pydreamer
               to each term (after the mean when free_avg, per step otherwise)
dyn_rep        dyn * max(free, KL(sg(q) || p)) + rep * max(free, KL(q || sg(p)))      DreamerV3, dreamerv3-torch
=============  =====================================================================  ===============================

sg is stop-gradient: the two terms of balance and dyn_rep have the same value and differ only in where the
gradient flows (into the prior for the dynamics term, into the posterior for the representation term).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._validation import check_float, check_like, check_tensor
from .gaussian import gaussian_kl

__all__ = ["KL_MODES", "KL_PRESETS", "kl_loss"]

KL_MODES = ("per_step", "mean", "shifted", "balance", "dyn_rep")

_DEFAULT_FREE = {"per_step": 3.0, "mean": 3.0, "shifted": 3.0, "balance": 0.0, "dyn_rep": 1.0}

#: The settings each project uses, to pass as ``kl_loss(..., **KL_PRESETS[name])``.
KL_PRESETS: dict[str, dict[str, Any]] = {
    "planet": {"mode": "shifted", "free_nats": 3.0},
    "planet_kaixhin": {"mode": "per_step", "free_nats": 3.0},
    "torchrl": {"mode": "per_step", "free_nats": 3.0},
    "dreamer_v1": {"mode": "mean", "free_nats": 3.0},
    "dreamerv2": {"mode": "balance", "free_nats": 0.0, "alpha": 0.8, "free_avg": True},
    "dreamerv3": {"mode": "dyn_rep", "free_nats": 1.0, "dyn_scale": 1.0, "rep_scale": 0.1},
    "dreamerv3_torch": {"mode": "dyn_rep", "free_nats": 1.0, "dyn_scale": 0.5, "rep_scale": 0.1},
}


def _check_scalar(name: str, value: object, *, low: float = 0.0, high: float = float("inf")) -> float:
    value = check_float(name, value)
    if not (low <= value <= high) or value == float("inf"):
        raise ValueError(f"{name} must be a finite float in [{low}, {high}], got {value}")
    return float(value)


def kl_loss(
    q_mean: Tensor,
    q_std: Tensor,
    p_mean: Tensor,
    p_std: Tensor,
    *,
    mode: str = "per_step",
    free_nats: float | None = None,
    alpha: float = 0.8,
    dyn_scale: float = 0.5,
    rep_scale: float = 0.1,
    free_avg: bool | None = None,
) -> Tensor:
    """The KL term of the ELBO (to minimise) under a named convention; see the table in this module's docstring and
    the README, and :data:`KL_PRESETS` for each project's settings.

    Args:
        q_mean, q_std: [..., S] posterior q(z_t | h_t, o_t); the leading dims (B, T, ...) are averaged over.
        p_mean, p_std: [..., S] prior p(z_t | h_t), same shape, dtype and device.
        mode: "per_step", "mean", "shifted", "balance" or "dyn_rep".
        free_nats: the free-nats floor; default 3.0 for per_step / mean / shifted, 0.0 for balance, 1.0 for dyn_rep.
        alpha: balance's weight of the prior-side term KL(sg(q) || p) (DreamerV2: 0.8).
        dyn_scale, rep_scale: dyn_rep's weights of KL(sg(q) || p) and KL(q || sg(p)).
        free_avg: balance and dyn_rep only: apply free nats after the mean (True, DreamerV2's free_avg) or per step
            (False); default True for balance, False for dyn_rep.

    Returns:
        A scalar tensor in float32 (float64 for float64 inputs).
    """
    if mode not in KL_MODES:
        raise ValueError(f"mode must be one of {KL_MODES}, got {mode!r}")
    check_tensor("q_mean", q_mean)
    for name, t in (("q_std", q_std), ("p_mean", p_mean), ("p_std", p_std)):
        check_like(name, t, "q_mean", q_mean)
    if q_mean.numel() == 0:  # the mean over no steps would be a silent NaN
        raise ValueError(f"q_mean must hold at least one step to average the KL over, got shape {tuple(q_mean.shape)}")
    free = _check_scalar("free_nats", _DEFAULT_FREE[mode] if free_nats is None else free_nats)
    if free_avg is not None and not isinstance(free_avg, bool):
        raise TypeError(f"free_avg must be a bool or None, got {type(free_avg).__name__}")
    if free_avg is not None and mode not in ("balance", "dyn_rep"):
        raise ValueError(f"free_avg applies to modes 'balance' and 'dyn_rep' only, got mode {mode!r}")

    if mode in ("per_step", "mean", "shifted"):
        kl = gaussian_kl(q_mean, q_std, p_mean, p_std)
        if mode == "per_step":
            return kl.clamp_min(free).mean()
        if mode == "mean":
            return kl.mean().clamp_min(free)
        return (kl - free).clamp_min(0.0).mean()

    if mode == "balance":
        w_dyn = _check_scalar("alpha", alpha, high=1.0)
        w_rep = 1.0 - w_dyn
        after_mean = True if free_avg is None else bool(free_avg)
    else:
        w_dyn = _check_scalar("dyn_scale", dyn_scale)
        w_rep = _check_scalar("rep_scale", rep_scale)
        after_mean = False if free_avg is None else bool(free_avg)
    # Same values, different gradient paths: dyn trains the prior, rep trains the posterior.
    kl_dyn = gaussian_kl(q_mean.detach(), q_std.detach(), p_mean, p_std)
    kl_rep = gaussian_kl(q_mean, q_std, p_mean.detach(), p_std.detach())

    def floor(kl: Tensor) -> Tensor:
        return kl.mean().clamp_min(free) if after_mean else kl.clamp_min(free).mean()

    return w_dyn * floor(kl_dyn) + w_rep * floor(kl_rep)
