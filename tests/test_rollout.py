"""The whole-horizon imagination kernel (fastwm.kernels.rollout) against the reference step loop: open loop, closed loop
with an in-kernel policy MLP, in-kernel reward MLP (per step and summed), given and seeded noise, every cell kind."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import fastwm
from fastwm import reference
from fastwm.rollout import imagine_fused, pack_mlp
from fastwm.rssm import stack_states

from .conftest import assert_close

pytestmark = pytest.mark.interpreter

CONFIGS = [
    {"cell": "gru"},
    {"cell": "layernorm_gru", "act": "silu", "norm": True, "std_mode": "sigmoid2"},
    {"cell": "none", "std_mode": "softplus_clamp"},
]
CONFIG_IDS = ["gru", "lngru-norm-silu", "none"]


def _model(device, dtype, **kw) -> fastwm.RSSM:
    torch.manual_seed(0)
    return fastwm.RSSM(3, 9, **{"stoch": 5, "deter": 11, "hidden": 13, **kw}).to(device=device, dtype=dtype)


def _randn(shape, g, device, dtype):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)


def _start(m: fastwm.RSSM, b: int, g: torch.Generator) -> fastwm.State:
    w = m.prior2.weight
    return fastwm.State(*(_randn(t.shape, g, w.device, w.dtype) for t in m.initial(b)))


def _reference_loop(m64, start64, h, *, actions=None, policy=None, noise=None):
    states, acts = [], []
    s = start64
    with fastwm.backend("reference"), torch.no_grad():
        for t in range(h):
            a = actions[:, t] if policy is None else policy(m64.features(s))
            s = m64.img_step(s, a, noise[:, t])
            states.append(s)
            acts.append(a)
    return stack_states(states), torch.stack(acts, dim=1)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_open_loop_matches_reference(device, dtype, cfg, poison):
    m = _model(device, dtype, **cfg)
    m64 = copy.deepcopy(m).double()
    g = torch.Generator().manual_seed(1)
    b, h = 19, 4  # 19 rows: two row blocks, the last one partial
    start = _start(m, b, g)
    actions, noise = _randn((b, h, 3), g, device, dtype), _randn((b, h, 5), g, device, dtype)
    with fastwm.backend("triton"), torch.no_grad():
        out = m.imagine(actions, start, noise)
    ref, _ = _reference_loop(m64, fastwm.State(*(t.double() for t in start)), h, actions=actions.double(),
                             noise=noise.double())
    for name, a, e in zip(fastwm.State._fields, out, ref):
        assert_close(a, e, dtype, f"imagine.{name}")


@pytest.mark.parametrize("tiles", [(32, 16, 16), (32, 32, 32), (64, 32, 32), (128, 16, 16)],
                         ids=["32x16", "32", "64", "128"])
def test_bigger_row_blocks_match_reference(device, tiles, monkeypatch):
    # Large launches take bigger row blocks (fewer L2 reads of the weights per row): the same results, partial
    # last block included.
    import fastwm.kernels.rollout as kernels

    monkeypatch.setattr(kernels, "_rollout_tiles", lambda n, device, closed_loop, narrow=False, reward=False: tiles)
    block_m = tiles[0]
    dtype = torch.float32
    m = _model(device, dtype, cell="layernorm_gru", norm=True)
    m64 = copy.deepcopy(m).double()
    g = torch.Generator().manual_seed(4)
    b, h = block_m + 5, 2
    start = _start(m, b, g)
    actions, noise = _randn((b, h, 3), g, device, dtype), _randn((b, h, 5), g, device, dtype)
    with fastwm.backend("triton"), torch.no_grad():
        out = m.imagine(actions, start, noise)
    ref, _ = _reference_loop(m64, fastwm.State(*(t.double() for t in start)), h, actions=actions.double(),
                             noise=noise.double())
    for name, a, e in zip(fastwm.State._fields, out, ref):
        assert_close(a, e, dtype, f"imagine.{name}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_closed_loop_policy_and_reward_in_kernel(device, dtype, cfg):
    m = _model(device, dtype, **cfg)
    m64 = copy.deepcopy(m).double()
    f = m.feature_dim
    torch.manual_seed(2)
    policy = nn.Sequential(nn.Linear(f, 7), nn.ELU(), nn.Linear(7, 6), nn.ELU(), nn.Linear(6, 3), nn.Tanh())
    reward = nn.Sequential(nn.Linear(f, 8), nn.SiLU(), nn.Linear(8, 1))
    policy, reward = policy.to(device, dtype), reward.to(device, dtype)
    g = torch.Generator().manual_seed(3)
    b, h = 17, 3
    start = _start(m, b, g)
    noise = _randn((b, h, 5), g, device, dtype)
    packed_p, packed_r = pack_mlp(policy, f, 3), pack_mlp(reward, f, 1)
    assert packed_p is not None and packed_r is not None
    outs = {}
    for total in (False, True):
        outs[total] = imagine_fused(m.config, m.weights(), start.stoch, start.deter, h, policy=packed_p,
                                    reward=packed_r, reward_sum=total, noise=noise, write_feat=True)
    ref, ref_actions = _reference_loop(m64, fastwm.State(*(t.double() for t in start)), h,
                                       policy=copy.deepcopy(policy).double(), noise=noise.double())
    out = outs[False]
    assert_close(out.actions, ref_actions, dtype, "actions")
    for name in ("deter", "stoch", "mean", "std"):
        assert_close(getattr(out, name), getattr(ref, name), dtype, name)
    ref_feat = m64.features(ref)
    assert_close(out.features, ref_feat, dtype, "features")
    ref_reward = copy.deepcopy(reward).double()(ref_feat).squeeze(-1)
    assert_close(out.reward, ref_reward, dtype, "reward")
    assert_close(outs[True].ret, ref_reward.sum(-1), dtype, "return")
    assert_close(outs[True].final_stoch, ref.stoch[:, -1], dtype, "final_stoch")
    assert_close(outs[True].final_deter, ref.deter[:, -1], dtype, "final_deter")
    assert outs[True].reward is None and outs[False].ret is None


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_seeded_noise_is_philox_seed_plus_t(device, cfg):
    m = _model(device, torch.float64, **cfg)
    g = torch.Generator().manual_seed(4)
    b, h = 9, 3
    start = _start(m, b, g)
    actions = _randn((b, h, 3), g, device, torch.float64)
    with fastwm.backend("triton"), torch.no_grad():
        out = m.imagine(actions, start, generator=torch.Generator().manual_seed(12))
        again = m.imagine(actions, start, generator=torch.Generator().manual_seed(12))
    assert torch.equal(out.stoch, again.stoch)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=torch.Generator().manual_seed(12))
    noise = torch.stack([reference.philox_normal(seed + t, (b, 5), dtype=torch.float64, device=device)
                         for t in range(h)], dim=1)
    ref, _ = _reference_loop(copy.deepcopy(m), start, h, actions=actions, noise=noise)
    for name, a, e in zip(fastwm.State._fields, out, ref):
        assert_close(a, e, torch.float64, f"seeded {name}")


def test_long_horizon_returns_only_is_finite(device):
    # H = 1,000 with only the summed reward asked for: nothing [N, H] is allocated and the values stay finite. (The
    # interpreter runs about 0.15 s per program-step, so on the CPU the kernel runs 120 steps and the reference the
    # full 1,000.)
    m = _model(device, torch.float32, deter=8, hidden=16)
    reward = nn.Linear(m.feature_dim, 1).to(device)
    g = torch.Generator().manual_seed(5)
    start = _start(m, 16, g)
    h = 1000 if device.type == "cuda" else 120
    out = imagine_fused(m.config, m.weights(), start.stoch, start.deter, h, actions=torch.ones(16, h, 3,
                        device=device), reward=pack_mlp(reward, m.feature_dim, 1), reward_sum=True,
                        write_state=False, generator=torch.Generator().manual_seed(0))
    assert out.stoch is None and out.features is None and out.reward is None
    assert out.ret.shape == (16,) and torch.isfinite(out.ret).all()
    assert torch.isfinite(out.final_deter).all() and torch.isfinite(out.final_stoch).all()
    with fastwm.backend("reference"), torch.no_grad():
        ref = m.imagine(torch.ones(16, 1000, 3, device=device), start)
    assert torch.isfinite(ref.stoch).all() and torch.isfinite(ref.deter).all()


def test_imagine_keeps_gradients_when_asked(device):
    # With a gradient needed, imagine takes the differentiable per-step path (and gives the same values).
    m = _model(device, torch.float64)
    g = torch.Generator().manual_seed(6)
    start = _start(m, 5, g)
    actions = _randn((5, 2, 3), g, device, torch.float64).requires_grad_()
    noise = _randn((5, 2, 5), g, device, torch.float64)
    with fastwm.backend("triton"):
        out = m.imagine(actions, start, noise)
        assert out.stoch.requires_grad
        (grad,) = torch.autograd.grad(out.stoch.sum(), actions)
        with torch.no_grad():
            fused = m.imagine(actions, start, noise)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert_close(fused.stoch, out.stoch, torch.float64, "stoch")


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_a_generator_gives_the_same_imagination_with_or_without_gradient(device, cfg):
    # The differentiable step loop draws what the whole-horizon kernel draws (one seed, step t with seed + t): the same
    # generator gives the same samples, open and closed loop, and leaves the generator in the same state.
    m = _model(device, torch.float64, **cfg)
    start = _start(m, 4, torch.Generator().manual_seed(9))
    actions = _randn((4, 5, 3), torch.Generator().manual_seed(10), device, torch.float64)
    policy = nn.Sequential(nn.Linear(m.feature_dim, 6), nn.Tanh(), nn.Linear(6, 3)).double().to(device)
    runs = {}
    for grad in (True, False):
        g = torch.Generator(device=device).manual_seed(11)
        with fastwm.backend("triton"), torch.set_grad_enabled(grad):
            open_loop = m.imagine(actions, start, generator=g)
            closed, acts = m.rollout(policy, start, 3, generator=g)
        assert open_loop.stoch.requires_grad == grad and closed.stoch.requires_grad == grad
        runs[grad] = (*open_loop, *closed, acts, torch.randint(0, 2**62, (1,), generator=g, device=device))
    for i, (a, b) in enumerate(zip(runs[True], runs[False])):
        assert_close(a.detach(), b, torch.float64, f"output {i}")


def test_pack_mlp_accepts_plain_mlps_only():
    f = 10
    assert pack_mlp(nn.Linear(f, 1), f, 1) is not None
    assert pack_mlp(nn.Sequential(nn.Linear(f, 4), nn.ReLU(), nn.Linear(4, 2), nn.Tanh()), f, 2) is not None
    assert pack_mlp(nn.Sequential(nn.Linear(f, 4), nn.ReLU(), nn.Linear(4, 2)), f, 3) is None  # wrong width
    # inner widths that do not chain: the module's own forward raises, so it must not be packed
    assert pack_mlp(nn.Sequential(nn.Linear(f, 4), nn.Tanh(), nn.Linear(5, 1)), f, 1) is None
    assert pack_mlp(nn.Sequential(nn.Linear(f, 4), nn.LayerNorm(4), nn.Linear(4, 1)), f, 1) is None
    assert pack_mlp(nn.Sequential(nn.Linear(f, 4), nn.ReLU(), nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 1)), f,
                    1) is None  # mixed activations
    deep = [nn.Linear(f, 4)] + [m for _ in range(3) for m in (nn.ReLU(), nn.Linear(4, 4))]
    assert pack_mlp(nn.Sequential(*deep), f, 4) is None  # four Linear layers
    assert pack_mlp(lambda x: x, f, 1) is None


class _Scaled(nn.Linear):
    def forward(self, x):  # a subclass whose forward is not nn.Linear's
        return 0.1 * super().forward(x)


class _Negate(nn.Module):
    def forward(self, w):
        return -w


def _not_as_written(f: int, out: int) -> dict[str, nn.Module]:
    """Plain-looking float64 MLPs [f -> out] whose forward is not the bare product of their stored weights."""
    def mlp() -> nn.Sequential:
        return nn.Sequential(nn.Linear(f, 4), nn.ReLU(), nn.Linear(4, out)).double()

    cases: dict[str, nn.Module] = {
        "linear subclass": nn.Sequential(nn.Linear(f, 4), nn.ReLU(), _Scaled(4, out)).double(),
        "outer subclass": _Scaled(f, out).double(),
    }
    hooked = mlp()
    hooked[2].register_forward_hook(lambda mod, inp, res: res.clamp(-0.05, 0.05))
    cases["forward hook"] = hooked
    pre = mlp()
    pre.register_forward_pre_hook(lambda mod, inp: (inp[0] * 2,))
    cases["pre-hook"] = pre
    param = mlp()
    torch.nn.utils.parametrize.register_parametrization(param[0], "weight", _Negate())
    cases["parametrization"] = param
    cases["spectral norm"] = nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(f, out))).double()
    inst = mlp()  # a forward assigned on the instance, as wrappers (accelerate's hooks) do
    own = inst.forward
    inst.forward = lambda x: -own(x)
    cases["instance forward"] = inst
    return cases


def test_pack_mlp_refuses_what_does_not_run_as_written():
    # Reading the weights of any of these would run another function than the module's forward.
    f = 10
    for name, module in _not_as_written(f, 2).items():
        assert pack_mlp(module, f, 2) is None, name
    mixed = nn.Sequential(nn.Linear(f, 4), nn.ReLU(), nn.Linear(4, 2).double())
    assert pack_mlp(mixed, f, 2) is None  # layers of two dtypes
    plain = nn.Sequential(nn.Linear(f, 4), nn.ReLU(), nn.Linear(4, 2))
    handle = nn.modules.module.register_module_forward_hook(lambda mod, inp, res: res)
    try:
        assert pack_mlp(plain, f, 2) is None  # a global hook runs around every forward
    finally:
        handle.remove()
    assert pack_mlp(plain, f, 2) is not None


def test_rollout_runs_a_policy_that_is_not_plain_as_it_is(device):
    # The actions are policy(features) whatever the policy: one that is not plain runs in PyTorch, step by step.
    m = _model(device, torch.float64)
    start = _start(m, 3, torch.Generator().manual_seed(8))
    for name, policy in _not_as_written(m.feature_dim, m.action_dim).items():
        if name == "spectral norm":  # each forward takes a power-iteration step: not a function of the features
            continue
        policy = policy.to(device)
        with torch.no_grad(), fastwm.backend("triton"):
            dream, actions = m.rollout(policy, start, 2, generator=torch.Generator().manual_seed(0))
            assert_close(actions[:, 0], policy(m.features(start)), torch.float64, name)
            first = fastwm.State(*(t[:, 0] for t in dream))
            assert_close(actions[:, 1], policy(m.features(first)), torch.float64, name)


def test_row_blocks_stop_at_32_rows_with_an_mlp_in_the_kernel():
    # A policy or reward MLP in the loop spills above 32 rows in the sm_90 compile (kernels/rollout.py's notes).
    from fastwm.kernels.rollout import _tile_candidates

    for narrow in (False, True):
        for closed, reward in ((True, False), (False, True), (True, True)):
            assert max(t[0] for t in _tile_candidates(closed, narrow, reward)) <= 32, (narrow, closed, reward)
    assert max(t[0] for t in _tile_candidates(False, False)) > 32  # imagination alone takes bigger blocks


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_imagine_fused_checks_its_tensors(device, cfg):
    # The kernel reads raw memory: a wrong shape, dtype or device must be an error naming the tensor, never a read
    # past a buffer. (Every check runs before the launch.)
    m = _model(device, torch.float32, **cfg)
    w, n, h = m.weights(), 4, 3
    start = _start(m, n, torch.Generator().manual_seed(2))
    acts = torch.zeros(n, h, 3, device=device)
    noise = torch.zeros(n, h, 5, device=device)

    def call(stoch=start.stoch, deter=start.deter, horizon=h, actions=acts, noise=noise):
        return imagine_fused(m.config, w, stoch, deter, horizon, actions=actions, noise=noise)

    bad = {
        "actions must have shape": dict(actions=acts[:, :2]),
        "noise must have shape": dict(noise=noise[:, :1]),
        "actions must have the dtype of the weights (torch.float32)": dict(actions=acts.double()),
        "noise must have the dtype of the weights (torch.float32)": dict(noise=noise.half()),
        "stoch must have shape": dict(stoch=start.stoch[:, :4]),
        "deter must have shape": dict(deter=start.deter[:2]),
        "horizon must be >= 0": dict(horizon=-1),
        "actions must have shape (4, 3, 3)": dict(actions=torch.zeros(n, h, 2, device=device)),
    }
    for match, kw in bad.items():
        with pytest.raises((ValueError, TypeError), match=re.escape(match)):
            call(**kw)
