"""Benchmark cases of the RSSM: the one definition the harness and the pytest-benchmark file share.

A case is (benchmark, mode, provider, size, dtype, device):

* benchmark: one of :data:`BENCHMARKS`, a method of :class:`fastwm.RSSM`: ``"img_step"`` (one prior step of B rows),
  ``"obs_step"`` (one posterior step of B rows) or ``"observe"`` (the posterior filter over a [B, T] sequence). Rows
  name it ``"rssm_" + benchmark``.
* mode: ``"fwd"`` (the forward under ``torch.no_grad()``, as in data collection) or ``"fwd_bwd"`` (the forward, a
  scalar loss = the sum over the outputs of output * fixed random weights, then ``torch.autograd.grad`` of it with
  respect to every parameter on the path and every input: state.deter, state.stoch, action, embed). autograd.grad
  rather than ``loss.backward()``: nothing accumulates into ``.grad`` between repetitions, and every provider (the
  CUDA graph included) returns fresh gradient tensors each call.
* provider: one of :data:`PROVIDERS`:

  - ``"eager"``: the RSSM under ``fastwm.backend("reference")``, plain PyTorch (what a user's eager loop runs);
  - ``"compiled"``: ``torch.compile`` of the same eager function (the forward, or the forward and the loss in
    fwd_bwd; the backward is AOTAutograd's), ``mode="max-autotune-no-cudagraphs"`` by default on cuda,
    ``"reduce-overhead"`` or ``"default"`` on request (:data:`COMPILE_MODES`); the CPU always compiles in the default
    mode;
  - ``"graphed"``: the eager call (with its backward in fwd_bwd) captured once in a CUDA graph and replayed, following
    PyTorch's whole-network capture recipe (static inputs, three warm-up calls on a side stream, ``torch.cuda.graph``);
    the backward is captured with ``torch.autograd.grad`` as ``torch.cuda.make_graphed_callables`` does; cuda only;
  - ``"fastwm"``: the RSSM under ``fastwm.backend("triton")``, the fused kernels (cuda; on the CPU only under the
    Triton interpreter, far too slow to time, so the harness skips it there);
  - observe only (:data:`OBSERVE_ONLY`): ``"fused-steps"``, the per-step fused kernels (``obs_step`` on the Triton
    backend in a Python loop over T, what fastwm offered before the fused time loop) captured in a CUDA graph like
    "graphed", the baseline the fused time loop must beat (cuda only); ``"recompute"``, fastwm's observe with
    ``recompute=True`` (less memory kept for the backward, one more launch in it).

* size: an :class:`RSSMSize`; :data:`SIZES` holds the PlaNet / Dreamer V1 sizes (deter 200, stoch 30, hidden 200,
  GRUCell, ELU, softplus std, B x T = 50 x 50) and the dreamerv3-torch sizes (deter 512, stoch 32 Gaussian, hidden 512,
  LayerNorm GRU, LayerNorm + SiLU layers, 2 sigmoid(x / 2) std, its learned initial state, B x T = 16 x 64); both
  with action 6 and embed 1024 (the embedding width is ours: the peers' depends on the encoder). :data:`QUICK_SIZES`
  are tiny versions of both for smoke tests on the CPU.

Resets: observe is given ``is_first`` as a training batch has it, True at t = 0 of every sequence and at about one
row-step in 32 more (episode starts inside the sampled chunks; seeded, the same for every provider). Each provider
resets there to the model's initial state (zeros for planet, the learned one for dreamerv3).

Noise: every provider is given the same explicit noise tensors, so they all do the same work and nobody pays for
drawing it: the posterior (and in obs_step the prior) sample noise of img_step / obs_step, and the posterior noise of
observe. observe is not given the prior's sample noise (its ``prior_noise``), as a training loop does not give it:
each provider draws it as it would for a user (the reference with ``torch.randn``, [B, S] per step; inside the CUDA
graph that is a replayed Philox draw; fastwm as its kernels do).

:func:`build_case` returns a zero-argument callable that runs the case once; the harness times it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

import fastwm
from fastwm import State
from fastwm.observe import saved_bytes

from ._common import DTYPES, baseline_unavailable, compiled_tag, graph_unavailable, kernels_unavailable

__all__ = [
    "ANCHOR_US_PER_STEP",
    "BASELINES",
    "BENCHMARKS",
    "OBSERVE_ONLY",
    "OBSERVE_RESETS",
    "COMPILE_MODES",
    "DTYPES",
    "MODES",
    "PROVIDERS",
    "QUICK_SIZES",
    "SIZES",
    "BenchCase",
    "RSSMSize",
    "all_cases",
    "build_case",
    "case_id",
    "flop_per_row_step",
    "params_on_path",
    "provider_unavailable",
    "row_steps",
    "size_for",
    "steps_per_call",
]

BENCHMARKS = ("img_step", "obs_step", "observe")
MODES = ("fwd", "fwd_bwd")
PROVIDERS = ("eager", "compiled", "graphed", "fastwm", "fused-steps", "recompute")
# performance.md's anchor for the training recurrence: the best recurrent kernels known (cuDNN LSTM, FlashRNN) take
# about 2 us per step forward and 5 us forward+backward at batch 16, hidden 768, on an H100.
ANCHOR_US_PER_STEP = {"fwd": 2.0, "fwd_bwd": 5.0}
OBSERVE_ONLY = ("fused-steps", "recompute")  # providers of the observe benchmark only
BASELINES = ("eager", "compiled", "graphed", "fused-steps")  # what fastwm is compared with
COMPILE_MODES = ("max-autotune-no-cudagraphs", "reduce-overhead", "default")
GRAPHED = ("graphed", "fused-steps")  # the providers that capture a CUDA graph and replay it
GRAPH_WARMUP = 3  # eager calls on a side stream before capture (PyTorch's recipe uses 3; DDP needs 11, not used here)
RESET_RATE = 32  # observe's is_first: t = 0, and about one row-step in RESET_RATE more (episode starts in the chunks)
OBSERVE_RESETS = f"t=0 and ~1/{RESET_RATE} of row-steps"  # what the observe rows say of their resets


# ----------------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RSSMSize:
    """One model configuration and batch: the RSSM's constructor arguments plus B rows and T steps (observe only)."""

    name: str
    B: int
    T: int
    deter: int
    stoch: int
    hidden: int
    embed: int
    action: int
    cell: str
    act: str
    norm: bool
    std_mode: str
    initial: str = "zeros"

    def model_kwargs(self) -> dict[str, object]:
        return {
            "action_dim": self.action,
            "embed_dim": self.embed,
            "stoch": self.stoch,
            "deter": self.deter,
            "hidden": self.hidden,
            "cell": self.cell,
            "act": self.act,
            "norm": self.norm,
            "std_mode": self.std_mode,
            "initial": self.initial,
        }


_PLANET = {"cell": "gru", "act": "elu", "norm": False, "std_mode": "softplus"}
_DREAMERV3 = {"cell": "layernorm_gru", "act": "silu", "norm": True, "std_mode": "sigmoid2", "initial": "learned"}

SIZES: dict[str, RSSMSize] = {
    # PlaNet / Dreamer V1 / TorchRL defaults.
    "planet": RSSMSize("planet", 50, 50, 200, 30, 200, 1024, 6, **_PLANET),
    # dreamerv3-torch defaults with its Gaussian latent (its default latent is 32 x 32 discrete).
    "dreamerv3": RSSMSize("dreamerv3", 16, 64, 512, 32, 512, 1024, 6, **_DREAMERV3),
}
QUICK_SIZES: dict[str, RSSMSize] = {
    "planet": RSSMSize("planet", 4, 4, 32, 8, 32, 64, 6, **_PLANET),
    "dreamerv3": RSSMSize("dreamerv3", 4, 4, 32, 8, 32, 64, 6, **_DREAMERV3),
}


def size_for(name: str, quick: bool = False, *, B: int | None = None, T: int | None = None) -> RSSMSize:
    """The named size (tiny with ``quick``), with B and / or T replaced when given."""
    table = QUICK_SIZES if quick else SIZES
    if name not in table:
        raise ValueError(f"size must be one of {tuple(table)}, got {name!r}")
    size = table[name]
    if B is not None:
        size = replace(size, B=int(B))
    if T is not None:
        size = replace(size, T=int(T))
    if size.B < 1 or size.T < 1:
        raise ValueError(f"B and T must be positive, got B={size.B}, T={size.T}")
    return size


def params_on_path(size: RSSMSize, benchmark: str) -> int:
    """Weights one row-step multiplies by (performance.md's count, biases and norms left out): the input layer, the
    GRU, the prior head, and for obs_step / observe the posterior head."""
    _check(benchmark)
    s, a, d, hd, e = size.stoch, size.action, size.deter, size.hidden, size.embed
    n = (s + a) * hd + (hd + d) * 3 * d + d * hd + hd * 2 * s
    if benchmark != "img_step":
        n += (d + e) * hd + hd * 2 * s
    return n


def flop_per_row_step(size: RSSMSize, benchmark: str, mode: str = "fwd") -> int:
    """Matrix-product FLOPs of one row-step: 2 x parameters on the path forward, 3 times that forward + backward."""
    _check(benchmark, mode)
    fwd = 2 * params_on_path(size, benchmark)
    return fwd if mode == "fwd" else 3 * fwd


def saved_bytes_per_row_step(size: RSSMSize, dtype: torch.dtype, benchmark: str, mode: str,
                             provider: str) -> int | None:
    """What fastwm's observe keeps for its backward per row-step (:func:`fastwm.observe.saved_bytes`), on the rows of
    the fastwm and recompute providers in fwd_bwd; None elsewhere (``python -m benchmarks.saved_memory`` measures
    the eager reference's)."""
    if benchmark != "observe" or mode != "fwd_bwd" or provider not in ("fastwm", "recompute"):
        return None
    with torch.device("meta"):
        model = fastwm.RSSM(**size.model_kwargs(), dtype=dtype)
    return saved_bytes(model, recompute=provider == "recompute")


def row_steps(size: RSSMSize, benchmark: str) -> int:
    """Row-steps one call does: B for a single step, B x T for observe."""
    _check(benchmark)
    return size.B * (size.T if benchmark == "observe" else 1)


def steps_per_call(size: RSSMSize, benchmark: str) -> int:
    """Sequential steps one call does: 1, or T for observe."""
    _check(benchmark)
    return size.T if benchmark == "observe" else 1


# ----------------------------------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------------------------------


def _check(benchmark: str, mode: str | None = None, provider: str | None = None) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if provider is not None and provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider in OBSERVE_ONLY and benchmark != "observe":
        raise ValueError(f"provider {provider!r} times the observe benchmark only, got {benchmark!r}")


def provider_unavailable(provider: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why ``provider`` cannot run on ``device`` in ``dtype`` here, or None when it can."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    device = torch.device(device)
    if provider in ("eager", "compiled"):
        return baseline_unavailable(provider, device)
    if provider in GRAPHED:
        reason = graph_unavailable(device)
        if reason is not None or provider == "graphed":
            return reason
    return kernels_unavailable(
        device, dtype, needs=("fastwm.step_ops", "the fused RSSM step (fastwm/step_ops.py) is not in this checkout")
    )


# ----------------------------------------------------------------------------------------------------------------------
# Case builder
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class BenchCase:
    """One built case: ``fn()`` runs it once (asynchronously on cuda: the caller synchronizes).

    ``peak_mem_mb`` is set by providers whose timed call allocates nothing (graphed: the replay reuses the graph's
    private pool): the peak memory of the capture instead. None for the others: measure a call of ``fn``.
    ``compile_mode`` is the torch.compile mode of the compiled provider, None for the others."""

    benchmark: str
    mode: str
    provider: str
    size: RSSMSize
    dtype: torch.dtype
    device: torch.device
    fn: Callable[[], object]
    compile_mode: str | None = None
    peak_mem_mb: float | None = None


def _model(size: RSSMSize, dtype: torch.dtype, device: torch.device, seed: int) -> fastwm.RSSM:
    # Built on the CPU in float32 from a forked, seeded CPU generator: the same weights on every device and dtype.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fastwm.RSSM(**size.model_kwargs())
    return model.to(device=device, dtype=dtype)


class _Inputs:
    """Seeded inputs of a case (drawn on the CPU, then moved), and the forward that maps them to the outputs."""

    def __init__(self, benchmark: str, size: RSSMSize, dtype: torch.dtype, device: torch.device, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed + 1)

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

        b, t = size.B, size.T
        self.benchmark = benchmark
        self.tensors: dict[str, Tensor] = {}
        if benchmark == "observe":
            self.tensors["embed"] = randn(b, t, size.embed)
            self.tensors["action"] = randn(b, t, size.action).tanh()
            self.noise = randn(b, t, size.stoch)
            self.prior_noise = None
            first = torch.rand(b, t, generator=gen) < 1 / RESET_RATE
            first[:, 0] = True
            self.is_first: Tensor | None = first.to(device)
            self.lead: tuple[int, ...] = (b, t)
        else:
            self.tensors["deter"] = randn(b, size.deter).tanh()  # a GRU state lies in (-1, 1)
            self.tensors["stoch"] = randn(b, size.stoch)
            self.tensors["action"] = randn(b, size.action).tanh()
            if benchmark == "obs_step":
                self.tensors["embed"] = randn(b, size.embed)
            self.noise = randn(b, size.stoch)
            self.prior_noise = randn(b, size.stoch) if benchmark == "obs_step" else None
            self.is_first = None
            self.lead = (b,)
        self.mean = torch.zeros(b, size.stoch, device=device, dtype=dtype)  # unused by the step, part of the State
        self.std = torch.ones(b, size.stoch, device=device, dtype=dtype)
        # Output widths, in the order forward() returns them.
        widths = [size.deter, size.stoch, size.stoch, size.stoch]  # (post) deter, stoch, mean, std
        if benchmark != "img_step":
            widths += [size.stoch, size.stoch, size.stoch]  # prior stoch, mean, std (its deter is post's)
        self.loss_weights = [randn(*self.lead, w) for w in widths]

    def forward(self, model: fastwm.RSSM, provider: str = "eager") -> tuple[Tensor, ...]:
        x = self.tensors
        if self.benchmark == "img_step":
            state = State(x["deter"], x["stoch"], self.mean, self.std)
            return tuple(model.img_step(state, x["action"], self.noise))
        if self.benchmark == "obs_step":
            state = State(x["deter"], x["stoch"], self.mean, self.std)
            post, prior = model.obs_step(state, x["action"], x["embed"], self.noise, prior_noise=self.prior_noise)
        elif provider == "fused-steps":  # one obs_step per t, as a user's loop over the step kernels
            # the learned initial state computed once for the start and the resets, as observe does
            learned = model._learned_initial(None)
            post, prior, _ = model._observe_steps(x["embed"], x["action"], self.is_first,
                                                  model._initial(x["embed"].shape[0], None, None, learned),
                                                  self.noise, None, None, None, learned)
        else:
            post, prior = model.observe(x["embed"], x["action"], self.is_first, noise=self.noise,
                                        recompute=provider == "recompute")
        return (*post, prior.stoch, prior.mean, prior.std)

    def loss(self, outputs: Sequence[Tensor]) -> Tensor:
        return sum(torch.sum(o * w, dtype=torch.float32) for o, w in zip(outputs, self.loss_weights))


def _parameters(model: fastwm.RSSM, benchmark: str) -> list[Tensor]:
    """The parameters on the benchmark's path (img_step does not use the posterior head, the single steps do not
    use a learned initial state: only observe's resets do)."""
    return [p for n, p in model.named_parameters()
            if (benchmark != "img_step" or not n.startswith("post")) and (benchmark == "observe" or n != "initial_deter")]


def _check_compile_mode(compile_mode: str) -> None:
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")


def _compile(fn: Callable[[], object], device: torch.device, compile_mode: str) -> Callable[[], object]:
    # A fresh dynamo cache per case: each case compiles for its static shapes and never reaches the recompile limit.
    torch._dynamo.reset()
    if device.type != "cuda" or compile_mode == "default":
        return torch.compile(fn, dynamic=False)
    return torch.compile(fn, mode=compile_mode, dynamic=False)


def _graph(body: Callable[[], object], device: torch.device) -> tuple[Callable[[], object], float]:
    """Capture ``body`` (eager, static inputs) in a CUDA graph: warm-up calls on a side stream, then the capture.
    Returns the replaying callable (it returns the graph's static outputs) and the capture's peak memory in MB."""
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            body()  # lazy initialisation (cuBLAS handles and workspaces, autograd) happens outside the capture
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)

    graph = torch.cuda.CUDAGraph()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.cuda.graph(graph):
        static_out = body()
    torch.cuda.synchronize(device)
    peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 1e6

    def replay() -> object:
        graph.replay()
        return static_out

    replay.graph = graph  # type: ignore[attr-defined]  # keep the graph (and its pool) alive with the callable
    return replay, peak_mb


def _provider_fn(
    raw: Callable[[], object],
    provider: str,
    device: torch.device,
    compile_mode: str,
    backend_name: str,
    leaves: list[Tensor] | None = None,
) -> tuple[Callable[[], object], str | None, float | None]:
    """The callable that runs ``raw`` once for a baseline or a CUDA-graph provider, on fastwm's ``backend_name``:
    the forward under ``torch.no_grad()`` (``leaves`` None), or ``torch.autograd.grad`` of ``raw()`` (a scalar loss)
    with respect to ``leaves``. "compiled" compiles ``raw`` (in ``compile_mode`` on cuda, the default mode on the
    CPU), :data:`GRAPHED` captures the whole call here. Returns (the callable, the compile mode used or None, the
    capture's peak memory in MB or None)."""
    used_mode = None
    step_begin = None
    if provider == "compiled":
        used_mode = compile_mode if device.type == "cuda" else "default"
        inner = _compile(raw, device, used_mode)
        if used_mode == "reduce-overhead":
            step_begin = torch.compiler.cudagraph_mark_step_begin
    else:
        inner = raw

    if leaves is None:

        def body() -> object:
            with torch.no_grad():
                return inner()

    else:

        def body() -> object:
            return torch.autograd.grad(inner(), leaves)

    if provider in GRAPHED:
        with fastwm.backend(backend_name):
            fn, peak = _graph(body, device)
        return fn, None, peak

    def fn() -> object:
        if step_begin is not None:
            step_begin()  # cudagraph trees: each call is a new step, the previous call's outputs may be overwritten
        with fastwm.backend(backend_name):
            return body()

    return fn, used_mode, None


def build_case(
    benchmark: str,
    mode: str,
    provider: str,
    size: RSSMSize,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    compile_mode: str = "max-autotune-no-cudagraphs",
    seed: int = 0,
) -> BenchCase:
    """Build the model and the seeded inputs of a case and return the callable that runs it once.

    The "graphed" provider captures its graph here (after three warm-up calls). The "compiled" provider calls
    ``torch._dynamo.reset()`` here and compiles on the callable's first call, so build and warm up (call ``fn`` once)
    one compiled case before building the next. Run :func:`provider_unavailable` first: "graphed" and "fastwm" raise
    on a device they cannot run on.
    """
    _check(benchmark, mode, provider)
    _check_compile_mode(compile_mode)
    device = torch.device(device)
    if provider in GRAPHED and device.type != "cuda":
        raise ValueError(f"the {provider} provider needs a cuda device")
    model = _model(size, dtype, device, seed)
    inputs = _Inputs(benchmark, size, dtype, device, seed)
    backend_name = "triton" if provider in ("fastwm", "fused-steps", "recompute") else "reference"

    leaves = None
    if mode == "fwd":

        def raw() -> object:
            return inputs.forward(model, provider)

    else:
        leaves = _parameters(model, benchmark) + [t.requires_grad_() for t in inputs.tensors.values()]

        def raw() -> object:
            return inputs.loss(inputs.forward(model, provider))

    fn, used_mode, peak = _provider_fn(raw, provider, device, compile_mode, backend_name, leaves)
    return BenchCase(benchmark, mode, provider, size, dtype, device, fn, used_mode, peak)


def case_id(
    benchmark: str, mode: str, provider: str, size: RSSMSize, dtype: torch.dtype, compile_mode: str | None = None
) -> str:
    """A short readable id of a case (pytest ids, progress lines)."""
    prov = compiled_tag(provider, compile_mode)
    shape = f"{size.B}x{size.T}" if benchmark == "observe" else f"B{size.B}"
    return f"rssm_{benchmark}-{mode}-{prov}-{size.name}-{shape}-{str(dtype).removeprefix('torch.')}"


def all_cases(
    benchmarks: Sequence[str], modes: Sequence[str], providers: Sequence[str], sizes: Sequence[str]
) -> list[tuple[str, str, str, str]]:
    """The cross product (benchmark, mode, provider, size name), providers innermost so eager runs before the others."""
    return [(b, m, p, s) for b in benchmarks for m in modes for s in sizes for p in providers]
