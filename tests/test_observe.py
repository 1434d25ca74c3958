"""The fused observe (one forward launch, one reverse-time backward launch) against the float64 reference step loop:
every output, and the gradients of every parameter, the embeddings, the actions and the initial state, with resets in
the middle of sequences, given and seeded noise, NaN-poisoned buffers."""

from __future__ import annotations

import copy

import pytest
import torch

import fastwm
from fastwm import reference

from .conftest import assert_close

pytestmark = pytest.mark.interpreter

CONFIGS = [
    {"cell": "gru"},
    {"cell": "layernorm_gru", "act": "silu", "norm": True, "std_mode": "sigmoid2"},
    {"cell": "none", "std_mode": "softplus_clamp"},
    {"cell": "gru", "norm": True, "act": "silu"},
]
CONFIG_IDS = ["gru", "lngru-norm-silu", "none", "gru-norm-silu"]


def _model(device, dtype, **kw) -> fastwm.RSSM:
    torch.manual_seed(0)
    m = fastwm.RSSM(3, 9, **{"stoch": 5, "deter": 11, "hidden": 13, **kw})
    if m.initial_deter is not None:  # away from its zero start, so that tanh and its gradient are not trivial
        with torch.no_grad():
            m.initial_deter.normal_()
    return m.to(device=device, dtype=dtype)


def _randn(shape, g, device, dtype):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)


def _inputs(m: fastwm.RSSM, b: int, t: int, seed: int):
    w = m.prior2.weight
    g = torch.Generator().manual_seed(seed)
    start = fastwm.State(*(_randn(x.shape, g, w.device, w.dtype) for x in m.initial(b)))
    embed, action = _randn((b, t, 9), g, w.device, w.dtype), _randn((b, t, 3), g, w.device, w.dtype)
    noise, prior_noise = _randn((b, t, 5), g, w.device, w.dtype), _randn((b, t, 5), g, w.device, w.dtype)
    first = torch.zeros(b, t, dtype=torch.bool, device=w.device)
    if t > 2:
        first[::3, 2] = True  # resets in the middle of sequences
        first[1::4, 1] = True
    first[min(5, b - 1), 0] = True
    return start, embed, action, first, noise, prior_noise


def _run(m, backend, start, embed, action, first, noise, prior_noise, upstream_seed=1, recompute=False):
    leaves = [t.clone().requires_grad_() for t in (start.deter, start.stoch, embed, action)]
    with fastwm.backend(backend):
        post, prior, kl = m.observe(leaves[2], leaves[3], first, fastwm.State(leaves[0], leaves[1], start.mean,
                                    start.std), noise, prior_noise=prior_noise, return_kl=True, recompute=recompute)
    outs = [*post, *prior, kl]
    g = torch.Generator().manual_seed(upstream_seed)
    # random upstream gradients, some of them with odd strides
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    loss = sum((o * u.unsqueeze(-1).expand(*u.shape, 2)[..., 0]).sum() for o, u in zip(outs, ups) if o.numel())
    wanted = [x for x in leaves if x.numel()] + list(m.parameters())
    return outs, torch.autograd.grad(loss, wanted)


def _names(m):
    inputs = (["initial.deter"] if m.deter else []) + ["initial.stoch", "embed", "action"]
    return inputs + [n for n, _ in m.named_parameters()]


OUT_NAMES = ["post.deter", "post.stoch", "post.mean", "post.std", "prior.deter", "prior.stoch", "prior.mean",
             "prior.std", "kl"]


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_observe_matches_float64_reference(device, dtype, cfg, recompute, poison):
    m = _model(device, dtype, **cfg)
    m64 = copy.deepcopy(m).double()
    b, t = 19, 4  # 19 sequences: two row blocks, the last one partial
    start, embed, action, first, noise, prior_noise = _inputs(m, b, t, seed=2)
    outs, grads = _run(m, "triton", start, embed, action, first, noise, prior_noise, recompute=recompute)
    as64 = [x.double() for x in (embed, action, noise, prior_noise)]
    outs64, grads64 = _run(m64, "reference", fastwm.State(*(x.double() for x in start)), as64[0], as64[1], first,
                           as64[2], as64[3])
    eager = None
    if dtype in (torch.bfloat16, torch.float16):  # flash-attn's bound: the same-dtype eager loop's own error
        eager = _run(m, "reference", start, embed, action, first, noise, prior_noise)
    for i, (name, a, e) in enumerate(zip(OUT_NAMES, outs, outs64)):
        assert_close(a, e, dtype, name, None if eager is None else eager[0][i])
    for i, (name, a, e) in enumerate(zip(_names(m), grads, grads64)):
        assert_close(a, e, dtype, f"d {name}", None if eager is None else eager[1][i])


LEARNED = [{**CONFIGS[1], "initial": "learned"}, {**CONFIGS[3], "initial": "learned"}]


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("cfg", LEARNED, ids=["lngru-norm-silu", "gru-norm-silu"])
def test_observe_resets_to_the_learned_initial_state_in_the_time_loop(device, dtype, cfg, recompute, poison):
    """initial="learned" with resets at step 0 and in mid-sequence: the time loop restores the learned state
    (deter tanh(W), stoch the prior's mean from it) and sends every reset step's input-state gradient to it; against
    the float64 reference loop, every output and gradient, initial_deter's included. The per-step kernels must not
    run (they were the fallback)."""
    m = _model(device, dtype, **cfg)
    m64 = copy.deepcopy(m).double()
    b, t = 19, 4
    start, embed, action, first, noise, prior_noise = _inputs(m, b, t, seed=5)

    def no_steps(*args, **kwargs):
        raise AssertionError("observe fell back to the per-step kernels")

    m._observe_steps = no_steps  # an instance attribute over the method, deleted again below
    outs, grads = _run(m, "triton", start, embed, action, first, noise, prior_noise, recompute=recompute)
    del m._observe_steps
    as64 = [x.double() for x in (embed, action, noise, prior_noise)]
    outs64, grads64 = _run(m64, "reference", fastwm.State(*(x.double() for x in start)), as64[0], as64[1], first,
                           as64[2], as64[3])
    names = _names(m)
    assert grads64[names.index("initial_deter")].abs().min() > 0  # every feature reached through the resets
    eager = None
    if dtype in (torch.bfloat16, torch.float16):
        eager = _run(m, "reference", start, embed, action, first, noise, prior_noise)
    for i, (name, a, e) in enumerate(zip(OUT_NAMES, outs, outs64)):
        assert_close(a, e, dtype, name, None if eager is None else eager[0][i])
    for i, (name, a, e) in enumerate(zip(names, grads, grads64)):
        assert_close(a, e, dtype, f"d {name}", None if eager is None else eager[1][i])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_observe_computes_the_learned_initial_state_once(device, backend, monkeypatch):
    """From no given state, with resets: the start and the resets share one computation of the learned state (a
    handful of small launches each time, on the host's critical path of every training step)."""
    m = _model(device, torch.float32, initial="learned")
    _, embed, action, first, noise, prior_noise = _inputs(m, 4, 3, seed=6)
    calls = []
    compute = m._learned_initial

    def counted(*args, **kwargs):
        calls.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(m, "_learned_initial", counted)
    with fastwm.backend(backend):
        m.observe(embed, action, first, noise=noise, prior_noise=prior_noise)
    assert len(calls) == 1


@pytest.mark.parametrize("b,t", [(1, 1), (1, 3), (17, 1)])
def test_observe_edge_shapes(device, b, t):
    m = _model(device, torch.float64, cell="layernorm_gru", norm=True)
    start, embed, action, first, noise, prior_noise = _inputs(m, b, t, seed=3)
    outs, grads = _run(m, "triton", start, embed, action, first, noise, prior_noise)
    outs64, grads64 = _run(m, "reference", start, embed, action, first, noise, prior_noise)
    for name, a, e in zip(OUT_NAMES, outs, outs64):
        assert_close(a, e, torch.float64, name)
    for name, a, e in zip(_names(m), grads, grads64):
        assert_close(a, e, torch.float64, f"d {name}")


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_observe_empty_batch_forward_and_backward(device, cfg, recompute):
    # B = 0 (an empty or fully filtered batch): the shapes the reference gives, and zero gradients for every
    # parameter, the backward included (it once reached the weight products with unflattened [T, 0, X] tensors).
    m = _model(device, torch.float64, **cfg)
    g = torch.Generator().manual_seed(5)
    results = {}
    for backend in ("triton", "reference"):
        embed = _randn((0, 3, 9), g, device, torch.float64).requires_grad_()
        action = _randn((0, 3, 3), g, device, torch.float64).requires_grad_()
        with fastwm.backend(backend):
            post, prior, kl = m.observe(embed, action, torch.zeros(0, 3, dtype=torch.bool, device=device),
                                        return_kl=True, recompute=recompute)
        outs = [*post, *prior, kl]
        loss = sum(o.sum() for o in outs)
        grads = torch.autograd.grad(loss, [embed, action, *m.parameters()], allow_unused=True)
        results[backend] = outs, [torch.zeros_like(x) if d is None else d
                                  for x, d in zip([embed, action, *m.parameters()], grads)]
    for name, a, e in zip(OUT_NAMES, results["triton"][0], results["reference"][0]):
        assert a.shape == e.shape and a.dtype == e.dtype, name
    names = ["embed", "action"] + [n for n, _ in m.named_parameters()]
    for name, a, e in zip(names, results["triton"][1], results["reference"][1]):
        assert a.shape == e.shape and not a.any() and not e.any(), f"d {name}"


def test_observe_with_given_noise_leaves_the_random_state_alone(device):
    # Both noises given: nothing is drawn, as on the reference backend and in obs_step (user code after observe
    # stays reproducible across backends, and torch.func.vmap's randomness check does not fire).
    m = _model(device, torch.float32)
    _, embed, action, first, noise, prior_noise = _inputs(m, 4, 3, seed=6)
    after = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(7)
        with fastwm.backend(backend):
            m.observe(embed, action, first, noise=noise, prior_noise=prior_noise)
        after[backend] = torch.randn(3, device=device)
    torch.manual_seed(7)
    untouched = torch.randn(3, device=device)
    assert torch.equal(after["triton"], untouched) and torch.equal(after["reference"], untouched)


def test_observe_without_resets_or_state(device):
    m = _model(device, torch.float32)
    _, embed, action, _, noise, prior_noise = _inputs(m, 6, 3, seed=4)
    with fastwm.backend("triton"):
        post, prior = m.observe(embed, action, noise=noise, prior_noise=prior_noise)
    with fastwm.backend("reference"):
        post_r, prior_r = m.observe(embed, action, noise=noise, prior_noise=prior_noise)
    for name, a, e in zip(OUT_NAMES, (*post, *prior), (*post_r, *prior_r)):
        assert_close(a, e, torch.float32, name)


def test_seeded_observe_is_philox_seed_plus_t_and_backward_regenerates_it(device):
    m = _model(device, torch.float64)
    b, t = 7, 3
    start, embed, action, first, _, _ = _inputs(m, b, t, seed=5)
    with fastwm.backend("triton"):
        post, prior = m.observe(embed, action, first, start, generator=torch.Generator().manual_seed(21))
    seeds = torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=torch.Generator().manual_seed(21))
    q_noise = torch.stack([reference.philox_normal(seeds[0] + i, (b, 5), dtype=torch.float64, device=device)
                           for i in range(t)], dim=1)
    p_noise = torch.stack([reference.philox_normal(seeds[1] + i, (b, 5), dtype=torch.float64, device=device)
                           for i in range(t)], dim=1)
    assert_close(post.stoch, post.mean + post.std * q_noise, torch.float64, "post.stoch")
    assert_close(prior.stoch, prior.mean + prior.std * p_noise, torch.float64, "prior.stoch")
    # seeded forward + backward equals the same noise given
    m.zero_grad()
    with fastwm.backend("triton"):
        post, prior = m.observe(embed, action, first, start, generator=torch.Generator().manual_seed(21))
        (post.stoch.square().sum() + prior.stoch.sum()).backward()
    seeded = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with fastwm.backend("triton"):
        post, prior = m.observe(embed, action, first, start, q_noise, prior_noise=p_noise)
        (post.stoch.square().sum() + prior.stoch.sum()).backward()
    for (name, p), g in zip(m.named_parameters(), seeded):
        assert_close(g, p.grad, torch.float64, f"d {name}")


def test_observe_backward_is_deterministic(device):
    m = _model(device, torch.float32, cell="layernorm_gru", norm=True, act="silu")
    start, embed, action, first, noise, prior_noise = _inputs(m, 33, 3, seed=6)
    _, g1 = _run(m, "triton", start, embed, action, first, noise, prior_noise)
    _, g2 = _run(m, "triton", start, embed, action, first, noise, prior_noise)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("initial", ["zeros", "learned"])
def test_observe_op_compiles_fullgraph(device, initial):
    torch._dynamo.reset()
    m = _model(device, torch.float32, initial=initial)
    start, embed, action, first, noise, prior_noise = _inputs(m, 5, 2, seed=7)

    def loss_fn(embed, action):
        post, prior, kl = m.observe(embed, action, first, start, noise, prior_noise=prior_noise, return_kl=True)
        return post.stoch.square().sum() + prior.mean.sum() + kl.sum()

    with fastwm.backend("triton"):
        loss_c = torch.compile(loss_fn, fullgraph=True)(embed, action)
        grads_c = torch.autograd.grad(loss_c, list(m.parameters()))
        loss_e = loss_fn(embed, action)
        grads_e = torch.autograd.grad(loss_e, list(m.parameters()))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("initial", ["zeros", "learned"])
def test_opcheck_observe(device, initial):
    """torch.library.opcheck of fastwm::rssm_observe (schema, fake tensors, autograd registration, AOT dispatch),
    with resets, and with the learned initial state as the op's two optional inputs."""
    m = _model(device, torch.float32, cell="layernorm_gru", act="silu", norm=True, initial=initial)
    torch.library.opcheck(torch.ops.fastwm.rssm_observe.default, _op_args(m, 3, m._learned_initial(None)))


def _op_args(m: fastwm.RSSM, t_len: int, init: tuple | None, seed: int = 4) -> tuple:
    from fastwm.step_ops import _ACT_IDS, _CELL_IDS, _STD_IDS

    start, embed, action, first, _, _ = _inputs(m, 6, max(t_len, 1), seed=seed)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().requires_grad_()

    weights = [start.stoch.new_empty(0) if t is None else leaf(t) for t in m.weights()]
    seed_t = torch.tensor([3, 4], dtype=torch.int64, device=start.stoch.device)
    cfg = m.config
    init = (None, None) if init is None else tuple(None if t is None else leaf(t) for t in init)
    return (leaf(start.stoch), leaf(start.deter), leaf(action.transpose(0, 1)[:t_len]),
            leaf(embed.transpose(0, 1)[:t_len]), first.transpose(0, 1)[:t_len].to(torch.int8).contiguous(), *init,
            None, None, seed_t, weights, _CELL_IDS[cfg.cell], _ACT_IDS[cfg.act], bool(cfg.norm),
            _STD_IDS[cfg.std_mode], float(cfg.min_std), float(cfg.eps), False)


def test_observe_op_checks_its_initial_state_arguments(device):
    m = _model(device, torch.float32, initial="learned")
    stoch, deter = m._learned_initial(None)
    op = torch.ops.fastwm.rssm_observe.default
    with pytest.raises(ValueError, match="init_deter was given without init_stoch"):
        op(*_op_args(m, 2, (None, deter)))
    with pytest.raises(ValueError, match="init_stoch needs init_deter"):
        op(*_op_args(m, 2, (stoch, None)))


def test_observe_op_with_no_steps_gives_the_start_state_zero_gradients(device, poison):
    """T = 0 at the op (RSSM.observe returns before it): the state before step 0 reaches no output, so its
    gradients are zeros, not what the allocator held."""
    m = _model(device, torch.float32)
    args = _op_args(m, 0, None)
    out = torch.ops.fastwm.rssm_observe.default(*args)
    assert out[0].shape[0] == 0
    d_stoch, d_deter = torch.autograd.grad(out[1].sum() + out[7].sum() + out[0].sum(), args[:2], allow_unused=True)
    for name, g in (("stoch0", d_stoch), ("deter0", d_deter)):
        assert g is None or torch.equal(g, torch.zeros_like(g)), name


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_observe_keeps_the_documented_bytes_per_row_step(device, cfg, recompute):
    from fastwm.benchmarks.saved_memory import measure_saved_bytes

    from fastwm.observe import saved_bytes

    m = _model(device, torch.float32, **cfg)
    b, t = 6, 3
    _, embed, action, *_ = _inputs(m, b, t, seed=8)
    got = measure_saved_bytes(m, embed, action, backend="triton", recompute=recompute)
    assert got == b * t * saved_bytes(m, recompute=recompute) + 16  # + the two int64 seeds
    if not recompute:
        eager = measure_saved_bytes(m, embed, action, backend="reference")
        assert got < eager, (got, eager)


def test_observe_recompute_must_be_a_bool(device):
    m = _model(device, torch.float32)
    _, embed, action, *_ = _inputs(m, 2, 2, seed=9)
    with pytest.raises(TypeError, match="recompute must be a bool"):
        m.observe(embed, action, recompute=1)


# -- the feature split of the forward loop ----------------------------------------------------------------------------
# Its P programs per row block meet at grid barriers, so they must run at once: on the CPU, under the threaded
# interpreter of tests/concurrent.py. Sizes with several column blocks of 16 per layer: deter 40 (3 blocks), hidden
# 70 (5), so that with P = 4 some programs own no feature of the cell.

SPLIT_CASES = [(2, CONFIGS[0], False), (4, CONFIGS[1], False), (3, CONFIGS[2], False), (4, CONFIGS[3], False),
               (2, CONFIGS[1], True), (3, LEARNED[0], False), (2, {**CONFIGS[0], "initial": "learned"}, True)]
SPLIT_IDS = [f"P{p}-{i}{'-recompute' if r else ''}"
             for (p, _, r), i in zip(SPLIT_CASES, CONFIG_IDS + [CONFIG_IDS[1], "lngru-learned", "gru-learned"])]


@pytest.fixture
def feature_split(monkeypatch):
    from fastwm.kernels import observe as k

    from .concurrent import concurrent_programs

    def use(p: int):
        monkeypatch.setattr(k, "FEATURE_SPLIT", p)
        monkeypatch.setattr(k, "LOOP_BLOCK_N", 16)
        monkeypatch.setattr(k, "INTERPRETER_RUNS_PROGRAMS_CONCURRENTLY", True)
        return concurrent_programs()

    return use


@pytest.mark.parametrize("p,cfg,recompute", SPLIT_CASES, ids=SPLIT_IDS)
def test_feature_split_observe_matches_float64_reference(device, p, cfg, recompute, feature_split, poison):
    """Forward and reverse loops with their features split over P programs (recompute: the backward's buffers
    rebuilt in one launch, then the split reverse loop)."""
    from fastwm.kernels import observe as k

    m = _model(device, torch.float32, deter=40, hidden=70, **cfg)
    m64 = copy.deepcopy(m).double()
    b, t = 19, 4
    start, embed, action, first, noise, prior_noise = _inputs(m, b, t, seed=12)
    with feature_split(p):
        assert k.split_programs(b, m.deter, 70, torch.device(device)) == p
        outs, grads = _run(m, "triton", start, embed, action, first, noise, prior_noise, recompute=recompute)
    as64 = [x.double() for x in (embed, action, noise, prior_noise)]
    outs64, grads64 = _run(m64, "reference", fastwm.State(*(x.double() for x in start)), as64[0], as64[1], first,
                           as64[2], as64[3])
    for name, a, e in zip(OUT_NAMES, outs, outs64):
        assert_close(a, e, torch.float32, name)
    for name, a, e in zip(_names(m), grads, grads64):
        assert_close(a, e, torch.float32, f"d {name}")


@pytest.mark.parametrize("cfg", [CONFIGS[2]], ids=["none"])
def test_feature_split_survives_a_lagging_program(cfg, feature_split, monkeypatch):
    """One program of the split forward loop left behind at every atomic (a stalled SM): the others run as far
    ahead as the grid barriers let them, and the results are still the row split's. With no cell and no norm only
    one grid barrier per step separates reading step t - 1's output shares from writing step t's: without the
    parity halves of ``part`` a program running ahead overwrote shares a lagging one had still to read."""
    import os
    import time

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a lagging program is staged in the threaded interpreter (TRITON_INTERPRET=1)")
    from triton.runtime import interpreter

    from fastwm.kernels import observe as k

    from . import concurrent

    m = _model("cpu", torch.float32, deter=40, hidden=70, **cfg)
    start, embed, action, first, noise, prior_noise = _inputs(m, 19, 4, seed=12)

    def observe_stoch() -> torch.Tensor:
        with torch.no_grad(), fastwm.backend("triton"):
            post, prior = m.observe(embed, action, first, start, noise, prior_noise=prior_noise)
        return torch.cat([post.stoch, post.mean, post.std, prior.mean, prior.std], -1)

    with feature_split(1):
        want = observe_stoch()
    builder = interpreter.InterpreterBuilder
    atomic = builder.create_atomic_rmw

    def lagging_atomic(self, *args):
        out = atomic(self, *args)
        if getattr(concurrent._local, "grid_idx", None) == (0, 0, 0):
            time.sleep(1.0)
        return out

    monkeypatch.setattr(builder, "create_atomic_rmw", lagging_atomic)
    with feature_split(3):
        assert k.split_programs(19, m.deter, 70, torch.device("cpu")) == 3
        got = observe_stoch()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_feature_split_stays_off_where_programs_run_one_by_one(monkeypatch):
    """The stock interpreter runs programs one after another: a grid barrier there would wait forever, so the split
    is refused on the CPU unless the interpreter runs them concurrently; FEATURE_SPLIT 0 (the default) is off."""
    from fastwm.kernels import observe as k

    cpu = torch.device("cpu")
    assert k.split_programs(16, 512, 512, cpu) == 1
    monkeypatch.setattr(k, "FEATURE_SPLIT", 16)
    assert k.split_programs(16, 512, 512, cpu) == 1
    monkeypatch.setattr(k, "INTERPRETER_RUNS_PROGRAMS_CONCURRENTLY", True)
    assert k.split_programs(16, 512, 512, cpu) == 16
    assert k.split_programs(16, 40, 20, cpu) == 2  # no more programs than column blocks (of LOOP_BLOCK_N = 32)
    assert k.split_programs(16, 20, 20, cpu) == 1


def test_threaded_interpreter_runs_programs_concurrently():
    """tests/concurrent.py itself: program 0 waits for a flag that only program 1 sets, which finishes only under
    concurrent programs (and raises its timeout, not hangs, when the flag never comes). The harness is the CPU
    interpreter's: on cuda the lone-program launch would really wait forever."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("tests the threaded interpreter (TRITON_INTERPRET=1): a GPU runs programs concurrently anyway")
    import triton
    import triton.language as tl

    from .concurrent import concurrent_programs

    @triton.jit
    def handshake(flag_ptr, out_ptr):
        pid = tl.program_id(0)
        if pid == 1:
            tl.atomic_add(flag_ptr, 1, sem="release")
        else:
            while tl.atomic_add(flag_ptr, 0, sem="acquire") < 1:
                pass
            tl.store(out_ptr, 7.0)

    flag, out = torch.zeros(1, dtype=torch.int32), torch.zeros(1)
    with concurrent_programs(timeout_s=60):
        handshake[(2,)](flag, out)
    assert out.item() == 7.0 and flag.item() == 1
    with concurrent_programs(timeout_s=2), pytest.raises(TimeoutError, match="still running"):
        handshake[(1,)](torch.zeros(1, dtype=torch.int32), out)


def test_feature_split_seeded_noise_is_the_row_splits(device, feature_split):
    """Noise drawn in the kernel from the seed (posterior: seed[0] + t, as the row-split loop draws it): the split
    loop's samples are the row split's, and so are the gradients of a loss on them."""
    m = _model(device, torch.float64, deter=40, hidden=70, cell="gru", norm=True)
    start, embed, action, first, _, _ = _inputs(m, 7, 3, seed=13)
    results = []
    for p in (1, 3):
        m.zero_grad()
        with feature_split(p), fastwm.backend("triton"):
            post, prior = m.observe(embed, action, first, start, generator=torch.Generator().manual_seed(5))
            (post.stoch.square().sum() + prior.stoch.sum()).backward()
        results.append(([*post, *prior], [q.grad.clone() for q in m.parameters()]))
    for name, a, e in zip(OUT_NAMES, results[1][0], results[0][0]):
        assert_close(a, e, torch.float64, name)
    for (name, _), a, e in zip(m.named_parameters(), results[1][1], results[0][1]):
        assert_close(a, e, torch.float64, f"d {name}")
