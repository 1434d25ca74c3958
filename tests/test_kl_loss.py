"""fastwm.kl_loss under every convention against the eager formula written out with torch.distributions."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

import fastwm

from .conftest import assert_close


def _inputs(device: torch.device, dtype: torch.dtype, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    shape = (4, 6, 30)
    qm = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    pm = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    qs = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5).exp()
    ps = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5).exp()
    return [t.to(device, dtype).requires_grad_() for t in (qm, qs, pm, ps)]


def _kl(qm, qs, pm, ps):
    return kl_divergence(Independent(Normal(qm, qs), 1), Independent(Normal(pm, ps), 1))


def _sg(*ts):
    return [t.detach() for t in ts]


def eager_kl_loss(qm, qs, pm, ps, mode, free, alpha=0.8, dyn=0.5, rep=0.1, free_avg=None):
    """The conventions as each project writes them (peers.md)."""
    if mode == "per_step":
        return torch.clamp(_kl(qm, qs, pm, ps), min=free).mean()
    if mode == "mean":
        return torch.clamp(_kl(qm, qs, pm, ps).mean(), min=free)
    if mode == "shifted":
        return torch.clamp(_kl(qm, qs, pm, ps) - free, min=0.0).mean()
    kl_dyn = _kl(*_sg(qm, qs), pm, ps)  # KL(sg(q) || p): trains the prior
    kl_rep = _kl(qm, qs, *_sg(pm, ps))  # KL(q || sg(p)): trains the posterior
    if mode == "balance":
        if free_avg in (None, True):
            return alpha * torch.clamp(kl_dyn.mean(), min=free) + (1 - alpha) * torch.clamp(kl_rep.mean(), min=free)
        return alpha * torch.clamp(kl_dyn, min=free).mean() + (1 - alpha) * torch.clamp(kl_rep, min=free).mean()
    if free_avg:
        return dyn * torch.clamp(kl_dyn.mean(), min=free) + rep * torch.clamp(kl_rep.mean(), min=free)
    return (dyn * torch.clamp(kl_dyn, min=free) + rep * torch.clamp(kl_rep, min=free)).mean()


CASES = [
    ("per_step", dict(free_nats=3.0)),
    ("per_step", dict(free_nats=1.0)),
    ("mean", dict(free_nats=3.0)),
    ("mean", dict(free_nats=1000.0)),  # the floor binds: zero gradient
    ("shifted", dict(free_nats=3.0)),
    ("balance", dict(free_nats=0.0, alpha=0.8)),
    ("balance", dict(free_nats=20.0, alpha=0.8, free_avg=False)),
    ("dyn_rep", dict(free_nats=1.0, dyn_scale=0.5, rep_scale=0.1)),
    ("dyn_rep", dict(free_nats=20.0, dyn_scale=1.0, rep_scale=0.1, free_avg=True)),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode,kwargs", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_kl_loss_matches_eager_formula(mode, kwargs, backend, device):
    dtype = torch.float64
    inputs = _inputs(device, dtype, scale=2.0)
    ref_inputs = [t.detach().cpu().requires_grad_() for t in inputs]
    with fastwm.backend(backend):
        loss = fastwm.kl_loss(*inputs, mode=mode, **kwargs)
    expected = eager_kl_loss(
        *ref_inputs, mode, kwargs["free_nats"], kwargs.get("alpha", 0.8), kwargs.get("dyn_scale", 0.5),
        kwargs.get("rep_scale", 0.1), kwargs.get("free_avg"),
    )
    assert loss.shape == () and loss.dtype == dtype
    assert_close(loss, expected, dtype, f"{mode} value")
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    ref_grads = torch.autograd.grad(expected, ref_inputs, allow_unused=True)
    for name, g, r in zip(("q_mean", "q_std", "p_mean", "p_std"), grads, ref_grads):
        r = torch.zeros_like(ref_inputs[0]) if r is None else r
        g = torch.zeros_like(inputs[0]) if g is None else g
        assert_close(g, r, dtype, f"{mode} d {name}")


def test_balance_splits_gradients():
    # alpha = 1: only the prior learns; alpha = 0: only the posterior does.
    qm, qs, pm, ps = _inputs(torch.device("cpu"), torch.float64)
    with fastwm.backend("reference"):
        g_prior_only = torch.autograd.grad(fastwm.kl_loss(qm, qs, pm, ps, mode="balance", alpha=1.0), (qm, pm),
                                           allow_unused=True)
        g_post_only = torch.autograd.grad(fastwm.kl_loss(qm, qs, pm, ps, mode="balance", alpha=0.0), (qm, pm),
                                          allow_unused=True)
    assert g_prior_only[0] is None or torch.all(g_prior_only[0] == 0)
    assert g_prior_only[1].abs().sum() > 0
    assert g_post_only[1] is None or torch.all(g_post_only[1] == 0)
    assert g_post_only[0].abs().sum() > 0


@pytest.mark.parametrize("name", sorted(fastwm.KL_PRESETS))
def test_presets_are_valid(name):
    qm, qs, pm, ps = _inputs(torch.device("cpu"), torch.float32)
    with fastwm.backend("reference"):
        loss = fastwm.kl_loss(qm, qs, pm, ps, **fastwm.KL_PRESETS[name])
    assert torch.isfinite(loss)


def test_default_free_nats_per_mode():
    qm, qs, pm, _ = _inputs(torch.device("cpu"), torch.float64, scale=0.01)
    ps = qs.detach().clone().requires_grad_()  # equal stds, close means: KL far below every floor
    with fastwm.backend("reference"):
        assert fastwm.kl_loss(qm, qs, pm, ps, mode="per_step").item() == pytest.approx(3.0)
        assert fastwm.kl_loss(qm, qs, pm, ps, mode="shifted").item() == pytest.approx(0.0)
        dyn_rep = fastwm.kl_loss(qm, qs, pm, ps, mode="dyn_rep")
    kl = _kl(qm, qs, pm, ps).detach()
    assert dyn_rep.item() == pytest.approx(0.6 * torch.clamp(kl, min=1.0).mean().item())


def test_kl_loss_float32_output_for_half_inputs(device):
    if device.type != "cuda":
        pytest.skip("half precision runs on cuda only")
    qm, qs, pm, ps = (t.detach().to(torch.bfloat16) for t in _inputs(device, torch.float32))
    assert fastwm.kl_loss(qm, qs, pm, ps).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(mode="nope"), ValueError, "mode must be one of"),
        (dict(free_nats=-1.0), ValueError, "free_nats"),
        (dict(free_nats="3"), TypeError, "free_nats"),
        (dict(mode="balance", alpha=1.5), ValueError, "alpha"),
        (dict(mode="dyn_rep", rep_scale=float("nan")), ValueError, "rep_scale"),
        (dict(mode="per_step", free_avg=True), ValueError, "free_avg"),
        (dict(mode="balance", free_avg="no"), TypeError, "free_avg must be a bool or None"),
    ],
)
def test_kl_loss_bad_arguments(kwargs, exc, match):
    qm, qs, pm, ps = _inputs(torch.device("cpu"), torch.float32)
    with pytest.raises(exc, match=match):
        fastwm.kl_loss(qm, qs, pm, ps, **kwargs)


def test_kl_loss_empty_batch_raises():
    qm, qs, pm, ps = (t[:0] for t in _inputs(torch.device("cpu"), torch.float32))
    with pytest.raises(ValueError, match="q_mean must hold at least one step"):
        fastwm.kl_loss(qm, qs, pm, ps)


def test_kl_loss_shape_mismatch_names_argument():
    qm, qs, pm, ps = _inputs(torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="p_std must have shape"):
        fastwm.kl_loss(qm, qs, pm, ps[..., :3])
