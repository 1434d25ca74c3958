"""The fused RSSM step and recurrent cells against the float64 eager reference: values and every gradient.

The implementation under test runs on the "triton" backend (``run_fused``, handed out by the ``impl`` fixture): on
cuda natively, on the CPU under the Triton interpreter. The ground truth is the same call on a float64 copy of the
module and inputs on the "reference" backend; for bfloat16 and float16 the bound is flash-attn's, with the eager
reference in the same dtype. Every upstream gradient is random with odd strides, and gradients are compared for every
parameter, every input and the initial state (the given noise excepted: the fused step treats it as a constant).
Outputs are NaN-poisoned before each launch (the ``poison`` fixture).

Shapes are small and odd (action 3, embed 9, stoch 5, deter 11, hidden 13) so the interpreter stays fast; batches of
1 and of 17 or 33 rows (the kernels work on blocks of 16 rows) and sequences of 1 and 4 steps.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import itertools
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

import fastwm
from fastwm import State

from .conftest import RTOL, assert_close

pytestmark = pytest.mark.interpreter

# The backend the fused implementation runs on. ("reference" here turns every fused-vs-reference comparison into a
# check of the test logic itself; the file must say "triton".)
FUSED_BACKEND = "triton"

HALF = (torch.bfloat16, torch.float16)
A, E, S, D, HD = 3, 9, 5, 11, 13  # action, embed, stoch, deter, hidden

# Representative configurations (not the whole product): every cell, both activations, norm off and on, every std mode.
RSSM_CONFIGS = {
    "gru-elu-softplus": {"cell": "gru", "act": "elu", "std_mode": "softplus"},
    "lngru-silu-norm-sigmoid2": {"cell": "layernorm_gru", "act": "silu", "norm": True, "std_mode": "sigmoid2"},
    "none-elu-clamp": {"cell": "none", "act": "elu", "std_mode": "softplus_clamp"},
    # min_std 0.3 so the clamp is active on a good share of the elements; eps away from the 1e-3 default
    "gru-silu-norm-clamp": {"cell": "gru", "act": "silu", "norm": True, "std_mode": "softplus_clamp", "min_std": 0.3,
                            "eps": 1e-5},
}
CONFIG_IDS = list(RSSM_CONFIGS)


def run_fused(fn: Callable, *args, **kwargs):
    """Call ``fn`` on the fused backend (the forward; its autograd graph keeps the fused backward)."""
    with fastwm.backend(FUSED_BACKEND):
        return fn(*args, **kwargs)


@pytest.fixture
def impl() -> Callable:
    """``run_fused``; skips while the fused step ops (fastwm/step_ops.py) do not exist yet. (find_spec rather than
    importorskip: a step_ops that exists but fails to import must fail the tests, not skip them.)"""
    if FUSED_BACKEND == "triton" and importlib.util.find_spec("fastwm.step_ops") is None:
        pytest.skip("fastwm.step_ops (the fused RSSM step and cells) is not there yet")
    return run_fused


# -- helpers ------------------------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape: Sequence[int], g: torch.Generator, device: torch.device, dtype: torch.dtype,
           scale: float = 1.0) -> Tensor:
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _odd_strides(t: Tensor) -> Tensor:
    """The same values with non-contiguous strides (as grad outputs often arrive)."""
    return t.unsqueeze(-1).expand(*t.shape, 2)[..., 0] if t.dim() else t


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random values for every parameter (LayerNorm affines away from 1 and 0, biases non-zero), drawn in float64."""
    g = _gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                v = torch.randn(p.shape, generator=g, dtype=torch.float64) * (1.5 / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                v = 1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            else:
                v = 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(v)
    return module


def _rssm(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> fastwm.RSSM:
    model = fastwm.RSSM(A, E, stoch=S, deter=D, hidden=HD, **cfg)
    return _randomize(model, seed).to(device=device, dtype=dtype)


def _state_inputs(model: fastwm.RSSM, b: int, g: torch.Generator, device, dtype, prefix: str = "state"
                  ) -> dict[str, Tensor]:
    return {
        f"{prefix}.deter": torch.tanh(_randn((b, model.deter), g, device, torch.float64, 1.5)).to(dtype),
        f"{prefix}.stoch": _randn((b, S), g, device, dtype),
        f"{prefix}.mean": _randn((b, S), g, device, dtype),
        f"{prefix}.std": _randn((b, S), g, device, torch.float64, 0.3).exp().to(dtype),
    }


def _state(t: dict[str, Tensor], prefix: str = "state") -> State:
    return State(*(t[f"{prefix}.{f}"] for f in State._fields))


def _fields(prefix: str, state: State) -> dict[str, Tensor]:
    return {f"{prefix}.{f}": v for f, v in zip(State._fields, state)}


Outputs = dict[str, Tensor]


def check_against_reference(
    fn: Callable[[nn.Module | None, dict[str, Tensor]], Outputs],
    inputs: dict[str, Tensor],
    dtype: torch.dtype,
    *,
    impl: Callable,
    module: nn.Module | None = None,
    constants: Sequence[str] = (),
    seed: int = 0,
) -> Outputs:
    """Run ``fn(module, inputs)`` fused, and on the reference backend on a float64 copy of module and inputs (and, for
    the half-precision bound, in the same dtype); compare every output and, under a random upstream gradient with odd
    strides, the gradient of every parameter of ``module`` and every input but the ``constants``. Returns the fused
    outputs."""
    leaves = {k: v.detach().clone().requires_grad_(k not in constants) for k, v in inputs.items()}
    leaves64 = {k: v.detach().double().requires_grad_(k not in constants) for k, v in inputs.items()}
    leaves_eager = {k: v.detach().clone().requires_grad_(k not in constants) for k, v in inputs.items()}
    module64 = None if module is None else copy.deepcopy(module).double()

    outs = impl(fn, module, leaves)
    with fastwm.backend("reference"):
        outs64 = fn(module64, leaves64)
        eager = fn(module, leaves_eager)
    assert outs.keys() == outs64.keys()
    half = dtype in HALF
    for name, ref in outs64.items():
        assert outs[name].dtype == eager[name].dtype, f"{name}: dtype {outs[name].dtype} != {eager[name].dtype}"
        assert_close(outs[name], ref, dtype, name, eager=eager[name])

    params = {} if module is None else {f"module.{n}": p for n, p in module.named_parameters()}
    params64 = {} if module is None else {f"module.{n}": p for n, p in module64.named_parameters()}
    wrt, wrt64, wrt_eager = ({**p, **{k: v for k, v in ls.items() if k not in constants}}
                             for p, ls in ((params, leaves), (params64, leaves64), (params, leaves_eager)))
    # Empty outputs (deter [B, 0] of cell "none") carry nothing to differentiate.
    names = [n for n, o in outs64.items() if o.numel() and o.requires_grad]
    for n in names:
        assert outs[n].requires_grad, f"{n} does not require grad"
    g = _gen(1000 + seed)
    grads_out = {n: torch.randn(outs64[n].shape, generator=g, dtype=torch.float64).to(outs[n].device, outs[n].dtype)
                 for n in names}

    def grads(o: Outputs, w: dict[str, Tensor], cast: Callable[[Tensor], Tensor]) -> dict[str, Tensor | None]:
        got = torch.autograd.grad([o[n] for n in names], list(w.values()), [cast(grads_out[n]) for n in names],
                                  allow_unused=True)
        return dict(zip(w, got))

    g_fused = grads(outs, wrt, _odd_strides)
    g_ref = grads(outs64, wrt64, lambda t: t.double())
    g_eager = grads(eager, wrt_eager, lambda t: t) if half else {}
    for name, ref in g_ref.items():
        got = g_fused[name]
        if ref is None:  # not on any path to the outputs (the posterior head in img_step, the state's mean and std)
            assert got is None or not got.any(), f"d {name}: non-zero gradient for an input the outputs do not use"
            continue
        assert got is not None, f"no gradient for {name}"
        assert got.dtype == wrt[name].dtype and got.shape == wrt[name].shape, f"d {name}: {got.dtype} {got.shape}"
        assert_close(got, ref, dtype, f"d {name}", eager=g_eager.get(name))
    return outs


# -- functional cells ---------------------------------------------------------------------------------------------------

# (B, X, D): one row, odd sizes, 33 rows = two full row blocks and one more, and powers of two.
CELL_SHAPES = [(1, 13, 11), (7, 13, 11), (33, 13, 11), (16, 32, 16)]
CELL_IDS = [f"B{b}-X{x}-D{d}" for b, x, d in CELL_SHAPES]


def _gru_inputs(b: int, x: int, d: int, g, device, dtype, bias: bool = True) -> dict[str, Tensor]:
    t = {
        "x": _randn((b, x) if b else (x,), g, device, dtype),
        "h": torch.tanh(_randn((b, d) if b else (d,), g, device, torch.float64, 1.5)).to(dtype),
        "weight_ih": _randn((3 * d, x), g, device, dtype, 1.5 / x**0.5),
        "weight_hh": _randn((3 * d, d), g, device, dtype, 1.5 / d**0.5),
    }
    if bias:
        t["bias_ih"] = _randn((3 * d,), g, device, dtype, 0.3)
        t["bias_hh"] = _randn((3 * d,), g, device, dtype, 0.3)
    return t


def _ln_gru_inputs(b: int, x: int, d: int, g, device, dtype) -> dict[str, Tensor]:
    return {
        "x": _randn((b, x) if b else (x,), g, device, dtype),
        "h": torch.tanh(_randn((b, d) if b else (d,), g, device, torch.float64, 1.5)).to(dtype),
        "weight": _randn((3 * d, x + d), g, device, dtype, 1.5 / (x + d) ** 0.5),
        "norm_weight": (1.0 + _randn((3 * d,), g, device, torch.float64, 0.3)).to(dtype),
        "norm_bias": _randn((3 * d,), g, device, dtype, 0.3),
    }


def _gru_fn(_m, t):
    return {"h'": fastwm.gru_cell(t["x"], t["h"], t["weight_ih"], t["weight_hh"], t.get("bias_ih"), t.get("bias_hh"))}


def _ln_gru_fn(eps: float = 1e-3, update_bias: float = -1.0):
    def fn(_m, t):
        return {"h'": fastwm.layernorm_gru_cell(t["x"], t["h"], t["weight"], t["norm_weight"], t["norm_bias"],
                                                eps=eps, update_bias=update_bias)}

    return fn


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", CELL_SHAPES, ids=CELL_IDS)
def test_gru_cell(shape, bias, dtype, device, poison, impl):
    check_against_reference(_gru_fn, _gru_inputs(*shape, _gen(1), device, dtype, bias=bias), dtype, impl=impl)


@pytest.mark.parametrize("shape", CELL_SHAPES, ids=CELL_IDS)
def test_layernorm_gru_cell(shape, dtype, device, poison, impl):
    check_against_reference(_ln_gru_fn(), _ln_gru_inputs(*shape, _gen(2), device, dtype), dtype, impl=impl)


def test_layernorm_gru_cell_eps_and_update_bias(dtype, device, poison, impl):
    check_against_reference(_ln_gru_fn(eps=1e-5, update_bias=0.5), _ln_gru_inputs(17, 13, 11, _gen(3), device, dtype),
                            dtype, impl=impl)


@pytest.mark.parametrize("cell", ["gru", "layernorm_gru"])
def test_cells_unbatched(cell, dtype, device, poison, impl):
    """x [X] and h [D] -> h' [D], as torch.nn.GRUCell accepts."""
    if cell == "gru":
        inputs, fn = _gru_inputs(0, 13, 11, _gen(4), device, dtype), _gru_fn
    else:
        inputs, fn = _ln_gru_inputs(0, 13, 11, _gen(4), device, dtype), _ln_gru_fn()
    out = check_against_reference(fn, inputs, dtype, impl=impl)
    assert out["h'"].shape == (11,)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gru_cell_is_nn_grucell(bias, dtype, device, poison, impl):
    """Against torch.nn.GRUCell itself (float64) with its own parameters, values and gradients."""
    cell = _randomize(nn.GRUCell(13, 11, bias=bias), 5).to(device, dtype)
    cell64 = copy.deepcopy(cell).double()
    g = _gen(5)
    x, h = _randn((17, 13), g, device, dtype).requires_grad_(), _randn((17, 11), g, device, dtype).requires_grad_()
    x64, h64 = x.detach().double().requires_grad_(), h.detach().double().requires_grad_()
    xe, he = x.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
    out = impl(fastwm.gru_cell, x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    ref = cell64(x64, h64)
    eager = cell(xe, he)
    assert_close(out, ref, dtype, "h'", eager=eager)
    go = _randn(out.shape, g, device, dtype)
    got = torch.autograd.grad(out, [x, h, *cell.parameters()], _odd_strides(go))
    want = torch.autograd.grad(ref, [x64, h64, *cell64.parameters()], go.double())
    got_eager = torch.autograd.grad(eager, [xe, he, *cell.parameters()], go)
    names = ["x", "h"] + [n for n, _ in cell.named_parameters()]
    for name, a, b, e in zip(names, got, want, got_eager):
        assert_close(a, b, dtype, f"d {name}", eager=e)


class _DreamerGRUCell(nn.Module):
    """dreamerv3-torch's GRUCell (networks.py), written out: Linear without bias, LayerNorm eps 1e-3, update bias -1."""

    def __init__(self, inp_size: int, size: int) -> None:
        super().__init__()
        self._size = size
        self.layers = nn.Sequential(nn.Linear(inp_size + size, 3 * size, bias=False), nn.LayerNorm(3 * size, eps=1e-3))

    def forward(self, inputs: Tensor, state: Tensor) -> Tensor:
        parts = self.layers(torch.cat([inputs, state], -1))
        reset, cand, update = torch.split(parts, [self._size] * 3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1)
        return update * cand + (1 - update) * state


def test_layernorm_gru_cell_module_is_dreamers(device, poison, impl):
    cell = _randomize(fastwm.LayerNormGRUCell(13, 11), 6).to(device, torch.float64)
    dreamer = _DreamerGRUCell(13, 11).to(device, torch.float64)
    with torch.no_grad():
        dreamer.layers[0].weight.copy_(cell.weight)
        dreamer.layers[1].weight.copy_(cell.norm.weight)
        dreamer.layers[1].bias.copy_(cell.norm.bias)
    g = _gen(6)
    x, h = _randn((17, 13), g, device, torch.float64), _randn((17, 11), g, device, torch.float64)
    out = impl(cell, x, h)
    assert_close(out, dreamer(x, h), torch.float64, "h'")
    go = _randn(out.shape, g, device, torch.float64)
    got = torch.autograd.grad(out, list(cell.parameters()), _odd_strides(go))
    want = torch.autograd.grad(dreamer(x, h), list(dreamer.parameters()), go)
    for name, a, b in zip(["weight", "norm.weight", "norm.bias"], got, want):
        assert_close(a, b, torch.float64, f"d {name}")


def test_cells_gradcheck_float64(device, impl):
    """torch.autograd.gradcheck in float64: full Jacobians on tiny shapes (each full check is a launch per input
    element), fast mode across two row blocks."""
    f64 = torch.float64
    cases = [  # (make inputs, fn, B, X, D, fast, bias); bias None is covered by test_gru_cell's nobias cases
        (_gru_inputs, fastwm.gru_cell, 2, 2, 1, False, True),
        (_ln_gru_inputs, fastwm.layernorm_gru_cell, 2, 2, 1, False, None),
        (_gru_inputs, fastwm.gru_cell, 17, 3, 2, True, True),
        (_ln_gru_inputs, fastwm.layernorm_gru_cell, 17, 3, 2, True, None),
    ]
    for i, (make, fn, b, x, d, fast, bias) in enumerate(cases):
        t = make(b, x, d, _gen(7 + i), device, f64, **({} if bias is None else {"bias": bias}))
        args = tuple(v.requires_grad_() for v in t.values())
        assert impl(torch.autograd.gradcheck, fn, args, fast_mode=fast), (fn.__name__, b, x, d, fast, bias)


# -- the RSSM step ------------------------------------------------------------------------------------------------------

# The fused step treats given noise as a constant (fastwm.step_ops: no gradient flows to it), unlike the reference and
# fastwm.gaussian_rsample; its gradient is not compared.
NOISE = ("noise", "prior_noise")


def _img_fn(model, t):
    return _fields("prior", model.img_step(_state(t), t["action"], t["noise"]))


def _obs_fn(model, t):
    post, prior, kl = model.obs_step(_state(t), t["action"], t["embed"], t["noise"], prior_noise=t["prior_noise"],
                                     return_kl=True)
    return {**_fields("post", post), **_fields("prior", prior), "kl": kl}


@pytest.mark.parametrize("b", [1, 17])
@pytest.mark.parametrize("cfg", CONFIG_IDS)
def test_img_step(cfg, b, dtype, device, poison, impl):
    model = _rssm(RSSM_CONFIGS[cfg], device, dtype, seed=10)
    g = _gen(11)
    inputs = {**_state_inputs(model, b, g, device, dtype), "action": _randn((b, A), g, device, dtype),
              "noise": _randn((b, S), g, device, dtype)}
    out = check_against_reference(_img_fn, inputs, dtype, impl=impl, module=model, constants=NOISE)
    assert out["prior.deter"].shape == (b, model.deter) and out["prior.stoch"].shape == (b, S)


@pytest.mark.parametrize("b", [17])  # one row: test_observe's B1-T1 cases
@pytest.mark.parametrize("cfg", CONFIG_IDS)
def test_obs_step(cfg, b, dtype, device, poison, impl):
    model = _rssm(RSSM_CONFIGS[cfg], device, dtype, seed=12)
    g = _gen(13)
    inputs = {**_state_inputs(model, b, g, device, dtype), "action": _randn((b, A), g, device, dtype),
              "embed": _randn((b, E), g, device, dtype), "noise": _randn((b, S), g, device, dtype),
              "prior_noise": _randn((b, S), g, device, dtype)}
    out = check_against_reference(_obs_fn, inputs, dtype, impl=impl, module=model, constants=NOISE)
    assert out["kl"].shape == (b,)
    assert (out["kl"] >= -RTOL[dtype] * 10).all()


def _observe_fn(is_first: Tensor | None):
    # observe takes no prior noise: the prior's sample is drawn, so prior.stoch is left out (its mean and std are in).
    def fn(model, t):
        post, prior, kl = model.observe(t["embed"], t["action"], is_first, _state(t), t["noise"], return_kl=True)
        return {**_fields("post", post), "prior.deter": prior.deter, "prior.mean": prior.mean, "prior.std": prior.std,
                "kl": kl}

    return fn


def _is_first(b: int, t_len: int, g: torch.Generator, device) -> Tensor:
    """Random resets, plus one at step 0 (the given state is dropped) and one in the middle."""
    first = torch.rand((b, t_len), generator=g) < 0.25
    first[0, 0] = True
    first[1 % b, t_len // 2] = True
    return first.to(device)


# (config, B, T, with resets): one row and one step with the default is_first for every config; 17 rows (one block + 1)
# over 4 steps with resets for one (each step of a sequence is a forward and a backward launch; the step itself is
# tested on every config by test_img_step and test_obs_step).
OBSERVE_CASES = [(cfg, 1, 1, False) for cfg in CONFIG_IDS] + [("lngru-silu-norm-sigmoid2", 17, 4, True)]
OBSERVE_IDS = [f"{cfg}-B{b}-T{t}{'-resets' if r else ''}" for cfg, b, t, r in OBSERVE_CASES]


@pytest.mark.parametrize("case", OBSERVE_CASES, ids=OBSERVE_IDS)
def test_observe(case, dtype, device, poison, impl):
    cfg, b, t_len, resets = case
    model = _rssm(RSSM_CONFIGS[cfg], device, dtype, seed=14)
    g = _gen(15)
    inputs = {**_state_inputs(model, b, g, device, dtype), "embed": _randn((b, t_len, E), g, device, dtype),
              "action": _randn((b, t_len, A), g, device, dtype), "noise": _randn((b, t_len, S), g, device, dtype)}
    is_first = _is_first(b, t_len, g, device) if resets else None
    out = check_against_reference(_observe_fn(is_first), inputs, dtype, impl=impl, module=model, constants=NOISE)
    assert out["post.stoch"].shape == (b, t_len, S) and out["post.deter"].shape == (b, t_len, model.deter)
    assert out["kl"].shape == (b, t_len)


@pytest.mark.parametrize("cfg", ["gru-silu-norm-clamp"])
def test_imagine(cfg, dtype, device, poison, impl):
    model = _rssm(RSSM_CONFIGS[cfg], device, dtype, seed=16)
    b, h_len = 17, 2
    g = _gen(17)
    inputs = {**_state_inputs(model, b, g, device, dtype), "actions": _randn((b, h_len, A), g, device, dtype),
              "noise": _randn((b, h_len, S), g, device, dtype)}
    out = check_against_reference(lambda m, t: _fields("dream", m.imagine(t["actions"], _state(t), t["noise"])),
                                  inputs, dtype, impl=impl, module=model, constants=NOISE)
    assert out["dream.stoch"].shape == (b, h_len, S) and out["dream.deter"].shape == (b, h_len, model.deter)


@pytest.mark.parametrize("cfg", ["gru-elu-softplus"])
def test_rollout(cfg, dtype, device, poison, impl):
    """rollout draws its noise from a generator: the same seed gives the same rollout, another seed another, every
    step fresh noise; with the noise read back from the samples, values and gradients match the float64 reference."""
    model = _rssm(RSSM_CONFIGS[cfg], device, dtype, seed=18)
    b, h_len = 17, 2
    g = _gen(19)
    st = {k: v.requires_grad_() for k, v in _state_inputs(model, b, g, device, dtype).items()}
    pw = _randn((A, model.feature_dim), g, device, dtype, 1.0 / model.feature_dim**0.5).requires_grad_()
    pb = _randn((A,), g, device, dtype, 0.3).requires_grad_()

    def policy_of(w, bias):
        return lambda f: torch.tanh(f @ w.T + bias)

    states, actions = impl(model.rollout, policy_of(pw, pb), _state(st), h_len, generator=_gen(5))
    again, again_a = impl(model.rollout, policy_of(pw, pb), _state(st), h_len, generator=_gen(5))
    other, _ = impl(model.rollout, policy_of(pw, pb), _state(st), 1, generator=_gen(6))
    assert states.stoch.shape == (b, h_len, S) and states.deter.shape == (b, h_len, model.deter)
    assert actions.shape == (b, h_len, A)
    for name, x, y in zip(State._fields, states, again):
        assert torch.equal(x, y), f"{name}: same generator seed, different rollout"
    assert torch.equal(actions, again_a)
    assert not torch.equal(states.stoch[:, :1], other.stoch), "another generator seed, the same rollout"
    for x in (*states, actions):
        assert torch.isfinite(x).all()
    noise = ((states.stoch - states.mean) / states.std).detach().double()
    assert noise.abs().max() < 6
    for t in range(1, h_len):
        assert not torch.allclose(noise[:, t], noise[:, 0]), f"step {t} reused step 0's noise"
    assert not torch.allclose(noise[0], noise[1]), "rows 0 and 1 got the same noise"
    if dtype in HALF:
        return  # noise read back from half-precision samples is too coarse for a value comparison

    # The reference, fed the noise the fused rollout drew (read back from its samples).
    model64 = copy.deepcopy(model).double()
    st64 = {k: v.detach().double().requires_grad_() for k, v in st.items()}
    pw64, pb64 = pw.detach().double().requires_grad_(), pb.detach().double().requires_grad_()
    policy64 = policy_of(pw64, pb64)
    state64, steps, acts64 = _state(st64), [], []
    with fastwm.backend("reference"):
        for t in range(h_len):
            a = policy64(model64.features(state64))
            state64 = model64.img_step(state64, a, noise[:, t])
            steps.append(state64)
            acts64.append(a)
    ref = State(*(torch.stack(parts, 1) for parts in zip(*steps)))
    ref_actions = torch.stack(acts64, 1)
    for name, x, y in zip(State._fields, states, ref):
        assert_close(x, y, dtype, f"rollout {name}")
    assert_close(actions, ref_actions, dtype, "rollout actions")

    gos = [_randn(x.shape, g, device, dtype) for x in (*states[1:], actions)]  # deter [B, H, 0] for cell "none"
    outs, outs64 = [*states[1:], actions], [*ref[1:], ref_actions]
    if model.deter:
        gos.append(_randn(states.deter.shape, g, device, dtype))
        outs.append(states.deter)
        outs64.append(ref.deter)
    names = [f"module.{n}" for n, _ in model.named_parameters()] + list(st) + ["policy.weight", "policy.bias"]
    got = torch.autograd.grad(outs, [*model.parameters(), *st.values(), pw, pb], [_odd_strides(x) for x in gos],
                              allow_unused=True)
    want = torch.autograd.grad(outs64, [*model64.parameters(), *st64.values(), pw64, pb64],
                               [x.double() for x in gos], allow_unused=True)
    for name, x, y in zip(names, got, want):
        if y is None:
            assert x is None or not x.any(), f"d {name}: non-zero gradient for an unused input"
            continue
        assert x is not None, f"no gradient for {name}"
        assert_close(x, y, dtype, f"rollout d {name}")


# -- is_first semantics -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ["gru-elu-softplus", "none-elu-clamp"])
def test_is_first_resets_like_a_fresh_run(cfg, device, poison, impl):
    """A row reset at step t0 continues exactly as a fresh one-row run started at t0 from ``initial`` with that step's
    action zeroed; the steps before its first reset continue from the given state; and the given state gets no
    gradient through a row reset at step 0. The fresh runs are float64 reference runs (the resets themselves happen in
    the module, on either backend)."""
    dtype = torch.float64
    model = _rssm(RSSM_CONFIGS[cfg], device, dtype, seed=20)
    b, t_len = 4, 4
    g = _gen(21)
    st = {k: v.requires_grad_() for k, v in _state_inputs(model, b, g, device, dtype).items()}
    embed, action = _randn((b, t_len, E), g, device, dtype), _randn((b, t_len, A), g, device, dtype)
    noise = _randn((b, t_len, S), g, device, dtype)
    is_first = torch.zeros(b, t_len, dtype=torch.bool)
    is_first[1, 0] = is_first[2, 2] = is_first[3, 1] = is_first[3, 3] = True  # row 0: never
    post, prior = impl(model.observe, embed, action, is_first.to(device), _state(st), noise)

    for r in range(b):
        starts = [0, *[t for t in range(1, t_len) if is_first[r, t]], t_len]
        for t0, t1 in itertools.pairwise(starts):
            a = action[r:r + 1, t0:t1].clone()
            if is_first[r, t0]:
                a[:, 0] = 0.0
                s0 = None
            else:  # t0 == 0 without a reset: the given state
                s0 = State(*(v[r:r + 1].detach() for v in _state(st)))
            with fastwm.backend("reference"):
                want_post, want_prior = model.observe(embed[r:r + 1, t0:t1], a, None, s0, noise[r:r + 1, t0:t1])
            for name, x, y in zip(State._fields, post, want_post):
                assert_close(x[r:r + 1, t0:t1], y, dtype, f"row {r} steps {t0}:{t1} post.{name}")
            for name in ("deter", "mean", "std"):
                assert_close(getattr(prior, name)[r:r + 1, t0:t1], getattr(want_prior, name), dtype,
                             f"row {r} steps {t0}:{t1} prior.{name}")

    loss = post.stoch.sum() + post.mean.pow(2).sum() + post.deter.sum()
    d_stoch, d_deter = torch.autograd.grad(loss, [st["state.stoch"], st["state.deter"]], allow_unused=True)
    assert d_stoch is not None
    assert not d_stoch[1].any(), "a row reset at step 0 still sends gradient into the given state"
    assert d_stoch[0].abs().sum() > 0
    if model.deter:
        assert not d_deter[1].any() and d_deter[0].abs().sum() > 0


# -- initial state and features -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", FUSED_BACKEND])
def test_empty_sequences(backend, device):
    """T = 0 (observe) and H = 0 (imagine, with and without a gradient) give empty [B, 0, ...] results of the
    state's dtype and device, on both backends."""
    model = _rssm(RSSM_CONFIGS["gru-elu-softplus"], device, torch.float32)
    b = 3
    with fastwm.backend(backend):
        post, prior, kl = model.observe(torch.zeros(b, 0, E, device=device), torch.zeros(b, 0, A, device=device),
                                        return_kl=True)
        dreams = [model.imagine(torch.zeros(b, 0, A, device=device), model.initial(b))]
        with torch.no_grad():
            dreams.append(model.imagine(torch.zeros(b, 0, A, device=device), model.initial(b)))
    assert kl.shape == (b, 0) and kl.dtype == torch.float32
    for s in (post, prior, *dreams):
        assert s.stoch.shape == s.mean.shape == s.std.shape == (b, 0, S) and s.deter.shape == (b, 0, D)
        assert all(x.dtype == torch.float32 and x.device.type == device.type for x in s)


@pytest.mark.parametrize("cfg", CONFIG_IDS)
def test_initial_and_features(cfg, dtype, device):
    model = _rssm(RSSM_CONFIGS[cfg], device, dtype)
    s = model.initial(17)
    d = 0 if RSSM_CONFIGS[cfg]["cell"] == "none" else D
    assert model.deter == d and model.feature_dim == S + d
    assert s.deter.shape == (17, d) and s.stoch.shape == s.mean.shape == s.std.shape == (17, S)
    assert all(x.dtype == dtype and x.device.type == device.type for x in s)
    assert not s.stoch.any() and not s.mean.any() and not s.deter.any() and bool((s.std == 1).all())
    f = model.features(s)
    assert f.shape == (17, S + d)
    seq = State(*(torch.stack([x, x], 1) for x in s))
    assert model.features(seq).shape == (17, 2, S + d)


# -- errors -------------------------------------------------------------------------------------------------------------


def _small(device: torch.device = torch.device("cpu"), **kw) -> fastwm.RSSM:
    return _rssm({**RSSM_CONFIGS["gru-elu-softplus"], **kw}, device, torch.float32)


def _bad_calls():
    """(id, call(model, state, B), exception, match): every bad input names its argument."""
    z = torch.zeros

    def st(m, b):
        return m.initial(b)

    return [
        ("action-width", lambda m, s, b: m.img_step(s, z(b, A + 1)), ValueError, r"^action must have shape \[4, 3\]"),
        ("action-batch", lambda m, s, b: m.img_step(s, z(b + 1, A)), ValueError, r"^action must have shape"),
        ("action-dtype", lambda m, s, b: m.img_step(s, z(b, A, dtype=torch.float64)), TypeError, r"^action must have"),
        ("action-not-tensor", lambda m, s, b: m.img_step(s, [0.0] * A), TypeError, r"^action must be a torch.Tensor"),
        ("noise-width", lambda m, s, b: m.img_step(s, z(b, A), z(b, S + 1)), ValueError, r"^noise must have shape"),
        ("embed-width", lambda m, s, b: m.obs_step(s, z(b, A), z(b, E - 1)), ValueError, r"^embed must have shape"),
        ("obs-action-width", lambda m, s, b: m.obs_step(s, z(b, A - 1), z(b, E)), ValueError,
         r"^action must have shape"),
        ("embed-dtype", lambda m, s, b: m.obs_step(s, z(b, A), z(b, E, dtype=torch.float64)), TypeError,
         r"^embed must have"),
        ("prior-noise", lambda m, s, b: m.obs_step(s, z(b, A), z(b, E), prior_noise=z(b, S - 1)), ValueError,
         r"^prior_noise must have shape"),
        ("generator", lambda m, s, b: m.img_step(s, z(b, A), generator=5), TypeError,
         r"^generator must be a torch.Generator"),
        ("observe-generator", lambda m, s, b: m.observe(z(b, 2, E), z(b, 2, A), generator=5), TypeError,
         r"^generator must be a torch.Generator"),
        ("imagine-generator", lambda m, s, b: m.imagine(z(b, 2, A), s, generator=5), TypeError,
         r"^generator must be a torch.Generator"),
        ("imagine-nograd-generator", lambda m, s, b: no_grad(m.imagine)(z(b, 2, A), s, generator=5), TypeError,
         r"^generator must be a torch.Generator"),
        ("rollout-generator", lambda m, s, b: no_grad(m.rollout)(nn.Linear(m.feature_dim, A), s, 2, generator=5), TypeError,
         r"^generator must be a torch.Generator"),
        ("overshooting-generator", lambda m, s, b: fastwm.latent_overshooting_kl(
            m, m.observe(z(b, 3, E), z(b, 3, A))[0], z(b, 3, A), distance=2, generator=5), TypeError,
         r"^generator must be a torch.Generator"),
        ("mixed-dtype-cell", lambda m, s, b: (m.cell.double(), m.observe(z(b, 2, E), z(b, 2, A))), TypeError,
         r"^the RSSM's parameters must all have one dtype and one device, found .*cell.weight_ih .*float64"),
        ("mixed-dtype-head", lambda m, s, b: (m.prior2.double(), m.img_step(s, z(b, A))), TypeError,
         r"^the RSSM's parameters must all have one dtype and one device, found .*prior2.weight .*float64"),
        ("state-type", lambda m, s, b: m.img_step(s.stoch, z(b, A)), TypeError, r"^state must be a fastwm.State"),
        ("state-deter-width", lambda m, s, b: m.img_step(s._replace(deter=z(b, D + 1)), z(b, A)), ValueError,
         r"^state.deter must have shape \[B, 11\]"),
        ("state-stoch-width", lambda m, s, b: m.img_step(s._replace(stoch=z(b, S - 1)), z(b, A)), ValueError,
         r"^state.stoch must have shape \[B, 5\]"),
        ("state-sequence", lambda m, s, b: m.img_step(State(*(x[:, None] for x in s)), z(b, A)), ValueError,
         r"^state.deter must have shape"),
        ("state-batch", lambda m, s, b: m.img_step(s._replace(stoch=z(b + 1, S)), z(b, A)), ValueError,
         r"^state.deter and state.stoch must have the same batch size"),
        ("state-dtype", lambda m, s, b: m.img_step(State(*(x.double() for x in s)), z(b, A)), TypeError,
         r"^state.deter must be torch.float32"),
        ("observe-embed-width", lambda m, s, b: m.observe(z(b, 2, E + 1), z(b, 2, A)), ValueError,
         r"^embed must have shape"),
        ("observe-embed-2d", lambda m, s, b: m.observe(z(b, E), z(b, A)), ValueError, r"^embed must have shape"),
        ("observe-action-width", lambda m, s, b: m.observe(z(b, 2, E), z(b, 2, A + 2)), ValueError,
         r"^action must have shape \[4, 2, 3\]"),
        ("observe-action-length", lambda m, s, b: m.observe(z(b, 2, E), z(b, 3, A)), ValueError,
         r"^action must have shape"),
        ("observe-action-dtype", lambda m, s, b: m.observe(z(b, 2, E), z(b, 2, A, dtype=torch.float64)), TypeError,
         r"^action must have"),
        ("observe-noise", lambda m, s, b: m.observe(z(b, 2, E), z(b, 2, A), noise=z(b, 2, S + 1)), ValueError,
         r"^noise must have shape"),
        ("is_first-1d", lambda m, s, b: m.observe(z(b, 2, E), z(b, 2, A), z(b, dtype=torch.bool)), ValueError,
         r"^is_first must have shape \[4, 2\]"),
        ("is_first-length", lambda m, s, b: m.observe(z(b, 2, E), z(b, 2, A), z(b, 3, dtype=torch.bool)), ValueError,
         r"^is_first must have shape"),
        ("is_first-list", lambda m, s, b: m.observe(z(b, 2, E), z(b, 2, A), [[False] * 2] * b), ValueError,
         r"^is_first must have shape"),
        ("observe-state-batch", lambda m, s, b: m.observe(z(b, 2, E), z(b, 2, A), state=st(m, b + 1)), ValueError,
         r"^state must have batch size 4"),
        ("imagine-actions-2d", lambda m, s, b: m.imagine(z(b, A), s), ValueError, r"^actions must have shape"),
        ("imagine-actions-width", lambda m, s, b: m.imagine(z(b, 2, A + 1), s), ValueError,
         r"^actions must have shape"),
        ("imagine-noise", lambda m, s, b: m.imagine(z(b, 2, A), s, z(b, 3, S)), ValueError, r"^noise must have shape"),
        ("rollout-horizon", lambda m, s, b: m.rollout(lambda f: f[:, :A], s, 0), ValueError,
         r"^horizon must be a positive int"),
        ("rollout-policy", lambda m, s, b: m.rollout("policy", s, 2), TypeError, r"^policy must be callable"),
        ("rollout-policy-output", lambda m, s, b: m.rollout(lambda f: f[:, :A + 1], s, 2), ValueError,
         r"^policy output must have shape"),
        ("initial-batch", lambda m, s, b: m.initial(-1), ValueError, r"^batch_size must be an int >= 0"),
        ("initial-bool", lambda m, s, b: m.initial(True), ValueError, r"^batch_size must be an int >= 0"),
        ("state-mean", lambda m, s, b: m.img_step(s._replace(mean=z(b, S + 2)), z(b, A)), ValueError,
         r"^state.mean must have state.stoch's shape \[4, 5\]"),
        ("state-std", lambda m, s, b: m.imagine(z(b, 2, A), s._replace(std=z(7))), ValueError,
         r"^state.std must have state.stoch's shape"),
        ("is_first-complex", lambda m, s, b: m.observe(z(b, 2, E), z(b, 2, A), z(b, 2, dtype=torch.complex64)),
         TypeError, r"^is_first must be bool"),
        ("features-type", lambda m, s, b: m.features([s.stoch, s.deter]), TypeError, r"^state must be a fastwm.State"),
        ("stoch-bool", lambda m, s, b: fastwm.RSSM(A, E, stoch=True), ValueError, r"^stoch must be a positive int"),
        ("eps-inf", lambda m, s, b: fastwm.RSSM(A, E, eps=float("inf")), ValueError, r"^eps must be a finite float"),
        ("cell", lambda m, s, b: _small(cell="lstm"), ValueError, r"^cell must be one of"),
        ("act", lambda m, s, b: _small(act="relu"), ValueError, r"^act must be one of"),
        ("std_mode", lambda m, s, b: _small(std_mode="exp"), ValueError, r"^std_mode must be one of"),
        ("initial", lambda m, s, b: _small(initial="learnt"), ValueError, r"^initial must be one of"),
        ("initial-learned-no-cell", lambda m, s, b: _small(cell="none", initial="learned"), ValueError,
         r'^initial="learned" needs a deterministic state'),
        ("min_std", lambda m, s, b: _small(min_std=-0.1), ValueError, r"^min_std must be a finite float >= 0"),
        ("deter", lambda m, s, b: fastwm.RSSM(A, E, deter=0), ValueError, r"^deter must be a positive int"),
        ("action_dim", lambda m, s, b: fastwm.RSSM(0, E), ValueError, r"^action_dim must be a positive int"),
        ("embed_dim", lambda m, s, b: fastwm.RSSM(A, 2.5), ValueError, r"^embed_dim must be a positive int"),
    ]


def no_grad(f: Callable) -> Callable:
    """``f`` called under torch.no_grad(): the one-launch imagination paths."""
    return torch.no_grad()(f)


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_errors(call, exc, match, device):
    # On the tests' device (torch.device as a context: the calls' tensors are made there), because the "triton"
    # backend refuses CPU tensors where the interpreter is off.
    model, b = _small(device), 4
    with torch.device(device), fastwm.backend(FUSED_BACKEND), pytest.raises(exc, match=match):
        call(model, model.initial(b), b)  # the checks run before any kernel


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda t: fastwm.gru_cell(t["x"], t["h"], t["weight_ih"][:, :-1], t["weight_hh"]), ValueError,
         r"^weight_ih must have shape \(33, 13\)"),
        (lambda t: fastwm.gru_cell(t["x"], t["h"], t["weight_ih"], t["weight_hh"][:-1]), ValueError,
         r"^weight_hh must have shape"),
        (lambda t: fastwm.gru_cell(t["x"], t["h"], t["weight_ih"], t["weight_hh"], t["bias_ih"][:-1]), ValueError,
         r"^bias_ih must have shape"),
        (lambda t: fastwm.gru_cell(t["x"], t["h"], t["weight_ih"], t["weight_hh"], None, t["bias_hh"].double()),
         TypeError, r"^bias_hh must have the dtype of x"),
        (lambda t: fastwm.gru_cell(t["x"], t["h"].double(), t["weight_ih"], t["weight_hh"]), TypeError,
         r"^h must have the dtype of x"),
        (lambda t: fastwm.gru_cell(t["x"], t["h"][:-1], t["weight_ih"], t["weight_hh"]), ValueError,
         r"^h must have shape"),
        (lambda t: fastwm.gru_cell(t["x"][None], t["h"], t["weight_ih"], t["weight_hh"]), ValueError,
         r"^x must have shape"),
        (lambda t: fastwm.gru_cell(t["x"].int(), t["h"], t["weight_ih"], t["weight_hh"]), TypeError,
         r"^x must be float16"),
        (lambda t: fastwm.layernorm_gru_cell(t["x"], t["h"], t["weight_ih"], t["bias_ih"], t["bias_hh"]), ValueError,
         r"^weight must have shape \(33, 24\)"),
        (lambda t: fastwm.layernorm_gru_cell(t["x"], t["h"], torch.zeros(33, 24), t["bias_ih"][:3], t["bias_hh"]),
         ValueError, r"^norm_weight must have shape"),
        (lambda t: fastwm.layernorm_gru_cell(t["x"], t["h"], torch.zeros(33, 24), t["bias_ih"], t["bias_hh"].half()),
         TypeError, r"^norm_bias must have the dtype"),
        (lambda t: fastwm.layernorm_gru_cell(t["x"], t["h"], torch.zeros(33, 24), t["bias_ih"], t["bias_hh"], eps=0.0),
         ValueError, r"^eps must be > 0"),
        (lambda t: fastwm.layernorm_gru_cell(t["x"], t["h"], torch.zeros(33, 24), t["bias_ih"], t["bias_hh"], eps="a"),
         TypeError, r"^eps must be a float"),
        (lambda t: fastwm.layernorm_gru_cell(t["x"], t["h"], torch.zeros(33, 24), t["bias_ih"], t["bias_hh"],
                                             update_bias=float("nan")), ValueError, r"^update_bias must be finite"),
    ],
)
def test_cell_bad_input_errors(call, exc, match):
    t = _gru_inputs(4, 13, 11, _gen(0), torch.device("cpu"), torch.float32)
    with fastwm.backend(FUSED_BACKEND), pytest.raises(exc, match=match):
        call(t)


@pytest.mark.parametrize("backend", ["reference", FUSED_BACKEND])
def test_value_checks_name_the_argument(backend, device):
    """With set_validate_args(True), a non-finite input raises naming it on every path: the steps, and the
    whole-sequence kernels (observe's time loop, imagine's and rollout's single launch) as well; is_first must hold
    0 and 1. Off, the same calls run."""
    with torch.device(device):  # every tensor and the policy below on the tests' device
        _value_checks_name_the_argument(backend, device)


def _value_checks_name_the_argument(backend: str, device: torch.device) -> None:
    model, b = _small(device), 4
    nan = torch.full((b, A), float("nan"))
    z, st = torch.zeros, model.initial(b)
    nan_state = st._replace(deter=torch.full((b, D), float("nan")))
    policy = nn.Linear(S + D, A)
    calls = [
        (r"^action must be finite", lambda: model.img_step(st, nan)),
        (r"^embed must be finite", lambda: model.obs_step(st, z(b, A), torch.full((b, E), float("inf")))),
        (r"^state.stoch must be finite",
         lambda: model.img_step(st._replace(stoch=torch.full((b, S), float("nan"))), z(b, A))),
        (r"^noise must be finite", lambda: model.img_step(st, z(b, A), torch.full((b, S), float("nan")))),
        (r"^prior_noise must be finite",
         lambda: model.obs_step(st, z(b, A), z(b, E), prior_noise=torch.full((b, S), float("nan")))),
        (r"^embed must be finite", lambda: model.observe(torch.full((b, 2, E), float("nan")), z(b, 2, A))),
        (r"^noise must be finite", lambda: model.observe(z(b, 2, E), z(b, 2, A), noise=torch.full((b, 2, S), 1e999))),
        (r"^state.deter must be finite", lambda: model.observe(z(b, 2, E), z(b, 2, A), state=nan_state)),
        (r"^is_first must hold only 0 and 1", lambda: model.observe(z(b, 2, E), z(b, 2, A), torch.full((b, 2), 0.5))),
        (r"^actions must be finite", lambda: model.imagine(torch.full((b, 2, A), float("nan")), st)),
        (r"^state.deter must be finite", lambda: model.rollout(policy, nan_state, 2)),
        (r"^policy output must be finite", lambda: model.rollout(lambda f: torch.full((b, A), float("nan")), st, 2)),
        # a plain MLP: in the kernel on the Triton backend (its parameters are checked), stepped on the reference
        (r"^policy (parameter weight|output) must be finite", lambda: model.rollout(nan_policy, st, 2)),
        (r"^RSSM parameter post2.bias must be finite", lambda: bad_model.observe(z(b, 2, E), z(b, 2, A))),
        (r"^RSSM parameter post2.bias must be finite", lambda: bad_model.obs_step(st, z(b, A), z(b, E))),
        (r"^RSSM parameter post2.bias must be finite", lambda: bad_model.imagine(z(b, 2, A), st)),
    ]
    bad_model, nan_policy = copy.deepcopy(model), copy.deepcopy(policy)
    with torch.no_grad():
        bad_model.post2.bias[1] = float("nan")
        nan_policy.weight[0, 1] = float("nan")
    fastwm.set_validate_args(True)
    try:
        with fastwm.backend(backend), torch.no_grad():  # no_grad: imagine and rollout take the single launch
            for match, call in calls:
                with pytest.raises(ValueError, match=match):
                    call()
    finally:
        fastwm.set_validate_args(False)
    with fastwm.backend(backend), torch.no_grad():
        post, _ = model.observe(z(b, 2, E), z(b, 2, A), torch.full((b, 2), 0.5))  # not checked: non-zero resets
    assert post.stoch.shape == (b, 2, S)


def test_step_loops_check_values_once_per_call(monkeypatch):
    """With set_validate_args(True), observe, imagine and rollout looping over steps (the reference backend; imagine
    with a gradient) check the inputs and parameters in one call (one host sync), not again at every step; rollout
    also checks each step's policy output, which is new input."""
    import fastwm.rssm as rssm_module
    import fastwm.step as step_module

    calls: list[list[str]] = []

    def counting(tensors):
        calls.append(list(tensors))
        return check_values(tensors)

    check_values = rssm_module.check_values
    monkeypatch.setattr(rssm_module, "check_values", counting)
    monkeypatch.setattr(step_module, "check_values", counting)
    model, b, t_len = _small(), 3, 4
    z, st = torch.zeros, model.initial(b)
    fastwm.set_validate_args(True)
    try:
        with fastwm.backend("reference"):
            model.observe(z(b, t_len, E), z(b, t_len, A), torch.zeros(b, t_len, dtype=torch.bool))
            assert len(calls) == 1 and {"embed", "action", "noise"} <= set(calls[0]), calls
            calls.clear()
            model.imagine(z(b, t_len, A), st)
            assert len(calls) == 1 and "actions" in calls[0], calls
            calls.clear()
            model.rollout(lambda f: torch.zeros(b, A), st, t_len)
            assert [c for c in calls if c != ["policy output"]] == [calls[0]] and len(calls) == 1 + t_len, calls
            calls.clear()
            model.obs_step(st, z(b, A), z(b, E))
            model.img_step(st, z(b, A))
            assert len(calls) == 2, calls
    finally:
        fastwm.set_validate_args(False)


@pytest.mark.parametrize("backend", ["reference", FUSED_BACKEND])
def test_is_first_as_numbers_and_empty_batch(backend, device):
    """is_first given as 0 / 1 floats or ints resets exactly as the bool tensor does; observe on an empty batch with
    no state returns empty States."""
    model, b, t_len = _small(device), 3, 3
    g = _gen(5)
    embed, action = torch.randn(b, t_len, E, generator=g).to(device), torch.randn(b, t_len, A, generator=g).to(device)
    noise = torch.randn(b, t_len, S, generator=g).to(device)
    first = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1]], device=device)
    with fastwm.backend(backend), torch.no_grad():
        want, _ = model.observe(embed, action, first.bool(), noise=noise, prior_noise=noise)
        for as_numbers in (first.float(), first, first.to(torch.uint8)):
            got, _ = model.observe(embed, action, as_numbers, noise=noise, prior_noise=noise)
            for name, x, y in zip(State._fields, got, want):
                torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"is_first {as_numbers.dtype}: {name}")
        post, prior, kl = model.observe(embed[:0], action[:0], return_kl=True)
    assert post.stoch.shape == prior.mean.shape == (0, t_len, S) and kl.shape == (0, t_len)


@pytest.mark.parametrize("cfg", ["gru-elu-softplus", "lngru-silu-norm-sigmoid2"])
def test_unused_heads_get_no_gradient(cfg, device, impl):
    """A head whose outputs the loss does not use gets None gradients on the fused backend, as autograd gives on the
    reference one (an optimizer skips a None gradient, but still moves a parameter whose gradient is zero): the
    prior head when only the posterior is used, in obs_step and observe; the posterior head when only the prior is
    used in obs_step or a one-step observe. Every other parameter gets a gradient on both."""
    dtype = torch.float64
    model = _rssm(RSSM_CONFIGS[cfg], device, dtype, seed=3)
    b = 2
    g = _gen(4)
    st = model.initial(b)
    embed, action = _randn((b, 3, E), g, device, dtype), _randn((b, 3, A), g, device, dtype)
    nz = _randn((b, 3, S), g, device, dtype)  # the same noise on both backends

    def step(i: int) -> Tensor:
        return model.obs_step(st, action[:, 0], embed[:, 0], nz[:, 0], prior_noise=nz[:, 1])[i]

    def seq(t_len: int, i: int) -> State:
        return model.observe(embed[:, :t_len], action[:, :t_len], noise=nz[:, :t_len], prior_noise=nz[:, :t_len])[i]

    cases = {
        "obs_step-post": lambda: step(0).mean.sum(),
        "obs_step-prior": lambda: step(1).stoch.sum(),
        "observe-post": lambda: seq(3, 0).stoch.sum(),
        "observe1-prior": lambda: seq(1, 1).mean.sum(),
        "observe-prior": lambda: seq(3, 1).std.sum(),  # T > 1: the posterior feeds the later priors
    }
    for name, loss in cases.items():
        grads = {}
        for backend in ("reference", "fused"):
            model.zero_grad(set_to_none=True)
            if backend == "fused":
                impl(loss).backward()
            else:
                with fastwm.backend("reference"):
                    loss().backward()
            grads[backend] = {k: p.grad for k, p in model.named_parameters()}
        for k, ref_grad in grads["reference"].items():
            got = grads["fused"][k]
            assert (got is None) == (ref_grad is None), f"{name}: d {k} is {got} but {ref_grad} on the reference"
            if got is not None:
                assert_close(got, ref_grad, dtype, f"{name}: d {k}")
        if name.endswith("post"):
            assert grads["fused"]["prior2.weight"] is None and grads["fused"]["post2.weight"] is not None
        if name in ("obs_step-prior", "observe1-prior"):
            assert grads["fused"]["post2.weight"] is None and grads["fused"]["prior2.weight"] is not None


def test_forward_is_observe_and_runs_under_ddp(device, impl):
    """rssm(...) is observe (forward hooks see it), and DistributedDataParallel (one process, gloo) wraps it: its
    gradients are observe's."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    model = _rssm(RSSM_CONFIGS["gru-elu-softplus"], device, torch.float32)
    g = _gen(3)
    embed = _randn((2, 3, E), g, device, torch.float32)
    action = _randn((2, 3, A), g, device, torch.float32)
    nz = _randn((2, 3, S), g, device, torch.float32)
    seen = []
    handle = model.register_forward_hook(lambda mod, args, out: seen.append(len(args)))
    post, prior, kl = impl(model, embed, action, None, None, nz, prior_noise=nz, return_kl=True)
    handle.remove()
    want = impl(model.observe, embed, action, noise=nz, prior_noise=nz, return_kl=True)
    assert seen == [5]
    for got, ref in zip((*post, *prior, kl), (*want[0], *want[1], want[2])):
        assert torch.equal(got, ref)
    model.zero_grad(set_to_none=True)
    def loss(fn):  # reaches every parameter (DDP gives a parameter no gradient reached zeros, not None)
        post, prior = fn(embed, action, noise=nz, prior_noise=nz)
        return post.stoch.sum() + (prior.std * prior.mean).sum()

    impl(loss, model.observe).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        impl(loss, ddp).backward()
    finally:
        dist.destroy_process_group()
    assert set(grads) == {k for k, _ in model.named_parameters()}
    for k, ref in grads.items():
        assert torch.equal(dict(model.named_parameters())[k].grad, ref), k


def _dv3_layer(x: Tensor, lin: nn.Linear, norm: nn.LayerNorm) -> Tensor:
    return torch.nn.functional.silu(torch.nn.functional.layer_norm(x @ lin.weight.T, norm.normalized_shape,
                                                                   norm.weight, norm.bias, norm.eps))


def _dv3_stats(m: fastwm.RSSM, y: Tensor, lin: nn.Linear) -> tuple[Tensor, Tensor]:
    mean, raw = (y @ lin.weight.T + lin.bias).chunk(2, -1)
    return mean, 2 * torch.sigmoid(raw / 2) + m.config.min_std


def _dreamerv3_torch_initial(m: fastwm.RSSM, w0: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """dreamerv3-torch's learned initial state: deter = tanh(W), stoch = the prior's mean read from that deter."""
    deter0 = torch.tanh(w0).expand(b, -1)
    return deter0, _dv3_stats(m, _dv3_layer(deter0, m.prior1, m.prior1_norm), m.prior2)[0]


def _dreamerv3_torch_observe(m: fastwm.RSSM, w0: Tensor, embed: Tensor, action: Tensor, first: Tensor,
                             noise: Tensor, prior_noise: Tensor) -> tuple[Tensor, ...]:
    """An independent loop in the manner of dreamerv3-torch's Gaussian RSSM with ``initial: 'learned'`` (LayerNorm
    GRU, Linear -> LayerNorm -> SiLU layers, std 2 sigmoid(raw / 2) + min_std): deter0 = tanh(W), stoch0 = the prior
    mean read from it; where is_first, the previous state becomes that initial state and the action zero."""
    layer, stats = _dv3_layer, functools.partial(_dv3_stats, m)

    def cell(x, h):
        parts = torch.nn.functional.layer_norm(torch.cat([x, h], -1) @ m.cell.weight.T, m.cell.norm.normalized_shape,
                                               m.cell.norm.weight, m.cell.norm.bias, m.cell.norm.eps)
        reset, cand, update = parts.chunk(3, -1)
        cand, update = torch.tanh(torch.sigmoid(reset) * cand), torch.sigmoid(update - 1)
        return update * cand + (1 - update) * h

    deter0, stoch0 = _dreamerv3_torch_initial(m, w0, embed.shape[0])
    h, z, outs = deter0, stoch0, []
    for t in range(embed.shape[1]):
        f = first[:, t, None].to(embed.dtype)
        h, z, a = h * (1 - f) + deter0 * f, z * (1 - f) + stoch0 * f, action[:, t] * (1 - f)
        h = cell(layer(torch.cat([z, a], -1), m.inp, m.inp_norm), h)
        pm, ps = stats(layer(h, m.prior1, m.prior1_norm), m.prior2)
        qm, qs = stats(layer(torch.cat([h, embed[:, t]], -1), m.post1, m.post1_norm), m.post2)
        z = qm + qs * noise[:, t]
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(qm, qs),
                                               torch.distributions.Normal(pm, ps)).sum(-1)
        outs.append((h, z, qm, qs, pm + ps * prior_noise[:, t], pm, ps, kl))
    return tuple(torch.stack(o, 1) for o in zip(*outs))


@pytest.mark.parametrize("backend", ["reference", FUSED_BACKEND])
@pytest.mark.parametrize("resets", [True, False], ids=["resets", "no-resets"])
def test_learned_initial_state_is_dreamerv3_torchs(backend, resets, device):
    """RSSM(initial="learned"): observe (from no given state, with is_first at step 0 and in mid-sequence, or with
    none) against an independent dreamerv3-torch-style loop in float64: every output, and the gradients into the
    learned initial deter (which reach it through every reset) and into the other parameters."""
    m = _randomize(fastwm.RSSM(A, E, stoch=S, deter=D, hidden=HD, cell="layernorm_gru", act="silu", norm=True,
                               std_mode="sigmoid2", initial="learned", dtype=torch.float64), 3).to(device)
    assert m.initial_deter is not None and m.initial_deter.shape == (D,)
    g = _gen(4)
    b, t_len = 5, 4
    embed, action, noise, prior_noise = (_randn(shape, g, device, torch.float64) for shape in
                                         ((b, t_len, E), (b, t_len, A), (b, t_len, S), (b, t_len, S)))
    first = torch.zeros(b, t_len, dtype=torch.bool, device=device)
    if resets:
        first[:, 0] = True
        first[1, 2] = first[3, 1] = first[3, 3] = True
    want = _dreamerv3_torch_observe(m, m.initial_deter, embed, action, first, noise, prior_noise)
    with fastwm.backend(backend):
        post, prior, kl = m.observe(embed, action, first if resets else None, noise=noise, prior_noise=prior_noise,
                                    return_kl=True)
    got = (post.deter, post.stoch, post.mean, post.std, prior.stoch, prior.mean, prior.std, kl)
    for name, x, y in zip(("deter", "stoch", "mean", "std", "prior stoch", "prior mean", "prior std", "kl"), got, want):
        assert_close(x, y, torch.float64, name)
    weights = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(device) for x in got]
    params = [m.initial_deter, m.prior2.bias, m.cell.weight, m.inp.weight]
    grads = torch.autograd.grad(sum((x * w).sum() for x, w in zip(got, weights)), params)
    grads_want = torch.autograd.grad(sum((x * w).sum() for x, w in zip(want, weights)), params)
    assert grads[0].abs().max() > 0
    for name, x, y in zip(("initial_deter", "prior2.bias", "cell.weight", "inp.weight"), grads, grads_want):
        assert_close(x, y, torch.float64, f"grad {name}")
    init = m.initial(2)
    deter0, stoch0 = _dreamerv3_torch_initial(m, m.initial_deter, 2)
    assert_close(init.deter, deter0, torch.float64, "initial deter")
    assert_close(init.stoch, stoch0, torch.float64, "initial stoch")
