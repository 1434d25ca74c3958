"""The fused RSSM step kernels (fastwm.step_ops) beyond what the module tests cover: in-kernel seeded noise, NaN-poisoned
buffers, the peers' sizes (deter 200, stoch 30, hidden 200), torch.compile and opcheck of the step ops."""

from __future__ import annotations

import copy

import pytest
import torch

import fastwm
from fastwm import reference

from .conftest import assert_close

pytestmark = pytest.mark.interpreter


def _model(device, dtype, **kw) -> fastwm.RSSM:
    torch.manual_seed(0)
    return fastwm.RSSM(3, 9, **{"stoch": 5, "deter": 11, "hidden": 13, **kw}).to(device=device, dtype=dtype)


def _state(m: fastwm.RSSM, b: int, g: torch.Generator) -> fastwm.State:
    w = m.prior2.weight
    return fastwm.State(*(torch.randn(t.shape, generator=g, dtype=torch.float64).to(w.device, w.dtype)
                          for t in m.initial(b)))


def _randn(shape, g, like):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(like.device, like.dtype)


@pytest.mark.parametrize("cell", ["gru", "layernorm_gru", "none"])
def test_seeded_noise_is_philox_of_the_drawn_seeds(device, cell):
    # noise=None: the kernel draws the posterior's noise from seed[0] and the prior's from seed[1], both taken from
    # the generator; fastwm.reference.philox_normal reproduces them, and the backward regenerates the same noise.
    m = _model(device, torch.float64, cell=cell)
    g = torch.Generator().manual_seed(3)
    b = 21
    state = _state(m, b, g)
    action, embed = _randn((b, 3), g, m.prior2.weight), _randn((b, 9), g, m.prior2.weight)
    with fastwm.backend("triton"):
        post, prior = m.obs_step(state, action, embed, generator=torch.Generator().manual_seed(11))
    seeds = torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=torch.Generator().manual_seed(11))
    q_noise = reference.philox_normal(seeds[0], (b, 5), dtype=torch.float64, device=device)
    p_noise = reference.philox_normal(seeds[1], (b, 5), dtype=torch.float64, device=device)
    assert_close(post.stoch, post.mean + post.std * q_noise, torch.float64, "post.stoch")
    assert_close(prior.stoch, prior.mean + prior.std * p_noise, torch.float64, "prior.stoch")
    # the same step with that noise given: identical values and gradients
    params = list(m.parameters())
    w_seeded = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(device) for t in (*post, *prior)]
    with fastwm.backend("triton"):
        out_s = m.obs_step(state, action, embed, generator=torch.Generator().manual_seed(11))
        loss_s = sum((t * w).sum() for t, w in zip((*out_s[0], *out_s[1]), w_seeded) if t.numel())
        grads_s = torch.autograd.grad(loss_s, params, allow_unused=True)
        out_n = m.obs_step(state, action, embed, q_noise, prior_noise=p_noise)
        loss_n = sum((t * w).sum() for t, w in zip((*out_n[0], *out_n[1]), w_seeded) if t.numel())
        grads_n = torch.autograd.grad(loss_n, params, allow_unused=True)
    for (name, _), gs, gn in zip(m.named_parameters(), grads_s, grads_n):
        assert (gs is None) == (gn is None), name
        if gs is not None:
            assert_close(gs, gn, torch.float64, f"d {name}")


def test_same_seed_same_result(device):
    m = _model(device, torch.float32)
    g = torch.Generator().manual_seed(4)
    state = _state(m, 17, g)
    actions = _randn((17, 3, 3), g, m.prior2.weight)
    with fastwm.backend("triton"):
        a = m.imagine(actions, state, generator=torch.Generator().manual_seed(9))
        b = m.imagine(actions, state, generator=torch.Generator().manual_seed(9))
        c = m.imagine(actions, state, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a.stoch, b.stoch)
    assert not torch.equal(a.stoch, c.stoch)


@pytest.mark.parametrize("cell,kw", [("gru", {}), ("layernorm_gru", {"norm": True, "act": "silu"}),
                                     ("none", {"norm": True})])
def test_poisoned_buffers_are_all_written(device, poison, cell, kw):
    # Every output and every saved / scratch buffer starts as NaN: an element the kernels read before writing, or
    # never write, shows up as a NaN or a mismatch. B = 33 spans three row blocks, the last one partial.
    m = _model(device, torch.float64, cell=cell, **kw)
    m64 = copy.deepcopy(m)
    g = torch.Generator().manual_seed(5)
    b = 33
    state = _state(m, b, g)
    action, embed = _randn((b, 3), g, m.prior2.weight), _randn((b, 9), g, m.prior2.weight)
    noise, prior_noise = _randn((b, 5), g, m.prior2.weight), _randn((b, 5), g, m.prior2.weight)
    inputs = [t.clone().requires_grad_() for t in (state.deter, state.stoch, action, embed)]

    def run(model, backend):
        with fastwm.backend(backend):
            st = fastwm.State(inputs[0], inputs[1], state.mean, state.std)
            post, prior, kl = model.obs_step(st, inputs[2], inputs[3], noise, prior_noise=prior_noise, return_kl=True)
        outs = [t for t in (*post, *prior, kl) if t.numel()]
        w = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=t.dtype).to(device)
             for i, t in enumerate(outs)]
        loss = sum((t * wt).sum() for t, wt in zip(outs, w))
        wanted = [t for t in inputs if t.numel()] + list(model.parameters())
        return outs, torch.autograd.grad(loss, wanted)

    outs_f, grads_f = run(m, "triton")
    outs_r, grads_r = run(m64, "reference")
    for i, (a, e) in enumerate(zip(outs_f, outs_r)):
        assert_close(a, e, torch.float64, f"output {i}")
    for i, (a, e) in enumerate(zip(grads_f, grads_r)):
        assert_close(a, e, torch.float64, f"grad {i}")


def test_peer_sizes_float32(device):
    # PlaNet / Dreamer V1 sizes: deter 200, stoch 30, hidden 200 (none a power of two), embed 1024, 50 rows.
    torch.manual_seed(1)
    m = fastwm.RSSM(6, 1024).to(device)
    m64 = copy.deepcopy(m).double()
    g = torch.Generator().manual_seed(6)
    b = 50
    state = _state(m, b, g)
    action, embed = _randn((b, 6), g, m.prior2.weight), _randn((b, 1024), g, m.prior2.weight)
    noise, prior_noise = _randn((b, 30), g, m.prior2.weight), _randn((b, 30), g, m.prior2.weight)
    with fastwm.backend("triton"):
        post, prior = m.obs_step(state, action, embed, noise, prior_noise=prior_noise)
        loss = post.stoch.square().sum() + prior.mean.sum() + post.deter.sum()
        grads = torch.autograd.grad(loss, list(m.parameters()))
    with fastwm.backend("reference"):
        st64 = fastwm.State(*(t.double() for t in state))
        post64, prior64 = m64.obs_step(st64, action.double(), embed.double(), noise.double(),
                                       prior_noise=prior_noise.double())
        loss64 = post64.stoch.square().sum() + prior64.mean.sum() + post64.deter.sum()
        grads64 = torch.autograd.grad(loss64, list(m64.parameters()))
    for a, e, name in zip((*post, *prior), (*post64, *prior64), ("deter", "stoch", "mean", "std") * 2):
        assert_close(a, e, torch.float32, name)
    for (name, _), a, e in zip(m.named_parameters(), grads, grads64):
        assert_close(a, e, torch.float32, f"d {name}")


def test_step_ops_registered():
    for name in ("rssm_step", "rssm_step_backward", "gru_cell", "gru_cell_backward", "layernorm_gru_cell",
                 "layernorm_gru_cell_backward"):
        assert hasattr(torch.ops.fastwm, name)


def test_fullgraph_compile_of_obs_step(device):
    torch._dynamo.reset()
    m = _model(device, torch.float32, cell="layernorm_gru", norm=True)
    g = torch.Generator().manual_seed(7)
    b = 5
    state = _state(m, b, g)
    action, embed = _randn((b, 3), g, m.prior2.weight), _randn((b, 9), g, m.prior2.weight)
    noise, prior_noise = _randn((b, 5), g, m.prior2.weight), _randn((b, 5), g, m.prior2.weight)

    def loss_fn(action, embed):
        post, prior, kl = m.obs_step(state, action, embed, noise, prior_noise=prior_noise, return_kl=True)
        return post.stoch.square().sum() + prior.std.sum() + kl.sum() + post.deter.sum()

    with fastwm.backend("triton"):
        compiled = torch.compile(loss_fn, fullgraph=True)
        loss_c = compiled(action, embed)
        grads_c = torch.autograd.grad(loss_c, list(m.parameters()))
        loss_e = loss_fn(action, embed)
        grads_e = torch.autograd.grad(loss_e, list(m.parameters()))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def test_opcheck_cells(device):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    h = torch.randn(3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w_ih = torch.randn(15, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w_hh = torch.randn(15, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(15, generator=g, dtype=torch.float64).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.fastwm.gru_cell.default, (x, h, w_ih, w_hh, b, None))
    w = torch.randn(15, 12, generator=g, dtype=torch.float64).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.fastwm.layernorm_gru_cell.default, (x, h, w, b, b.detach().clone(), 1e-3, -1.0))
