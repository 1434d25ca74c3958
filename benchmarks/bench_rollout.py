"""Benchmark cases of imagination and planning: the one definition the harness and the pytest-benchmark file share.

A case is (benchmark, provider, size, N, H, dtype, device), all forward only under ``torch.no_grad()``:

* benchmark: one of :data:`BENCHMARKS` (rows name it by :data:`ROW_NAMES`):

  - ``"imagine"`` (rows: ``"rssm_imagine"``): :meth:`fastwm.RSSM.imagine`, an open-loop prior rollout of H steps from a
    State of N random starts, actions [N, H, A] and the sample noise [N, H, S] given, so every provider does the same
    work and nobody pays for drawing noise. Output: the State with [N, H, ...] fields.
  - ``"imagine_return"`` (rows: ``"rssm_imagine_return"``): the same rollout scored by a reward MLP
    ``nn.Sequential(Linear(S + D, 200), ELU, Linear(200, 1))`` on every imagined feature, returning only the sum over
    the horizon, [N] (what a planner or a value estimate needs). The baselines run imagine, then the reward on the
    features [N, H, S + D], then the sum (in fp32); fastwm runs :func:`fastwm.rollout.imagine_fused` with the reward
    packed by :func:`fastwm.rollout.pack_mlp`, ``reward_sum=True, write_state=False``: nothing [N, H] is written.
  - ``"cem_decision"`` (rows: ``"cem_decision"``): one decision of :class:`fastwm.CEMPlanner` at PlaNet's settings
    (horizon 12, 1,000 candidates, top 100, 10 iterations, no warm start: PlaNet starts every decision from N(0, 1))
    for B beliefs (1 and 16), with the same reward MLP. Every iteration imagines B x 1,000 candidates. The sample noise
    is drawn inside the call as the planner draws it for a user (torch.randn per step in the reference, in-kernel
    Philox in fastwm). ``N`` in its rows is B x candidates, ``H`` the horizon. Providers: eager, graphed (the
    reference planner with ``cuda_graph=True``: its decisions captured once and replayed), fastwm, fastwm-graphed.

* provider: one of :data:`PROVIDERS`:

  - ``"eager"``: under ``fastwm.backend("reference")``, plain PyTorch: ``rssm.imagine`` loops ``img_step`` H times;
  - ``"compiled"``: ``torch.compile`` of the same eager function, with the compile modes of the RSSM suite
    (:data:`fastwm.benchmarks.bench_rssm.COMPILE_MODES`; ``max-autotune-no-cudagraphs`` by default on cuda, the
    default mode on the CPU); imagination only;
  - ``"graphed"``: the eager loop captured once in a CUDA graph and replayed (the RSSM suite's capture helper; for
    cem_decision the planner's own ``cuda_graph=True``); cuda only;
  - ``"fastwm"``: under ``fastwm.backend("triton")``: the whole horizon in ONE kernel launch (``rssm.imagine``,
    ``imagine_fused``; the planner launches one kernel per CEM iteration). cuda; on the CPU only under the Triton
    interpreter (``TRITON_INTERPRET=1``), far too slow to time, so the harness skips it there by default;
  - ``"fastwm-graphed"``: cem_decision only: the fastwm planner with ``cuda_graph=True`` (one graph launch per
    decision on the host instead of several launches per iteration); cuda only.

* size: a :class:`fastwm.benchmarks.bench_rssm.RSSMSize` (its B and T are not used here): ``"planet"`` (action 6,
  embed 1024, stoch 30, deter 200, hidden 200, GRUCell, ELU, softplus std) and ``"dreamerv3"`` (512 / 32 / 512,
  LayerNorm GRU, SiLU, LayerNorm MLPs, 2 sigmoid(x / 2) std); tiny versions of both with ``quick``. CEM runs at the
  planet size only (:data:`CEM_SIZES`).

The compute floor (performance.md): FLOPs per imagined row-step = 2 x the weights on the prior path, input (S + A) Hd,
GRU (Hd + D) 3D, prior D Hd + Hd 2S (plus the reward MLP's for imagine_return and cem_decision); the floor in
row-steps per second is the device's peak matrix throughput (:data:`PEAK_TFLOPS`) over that. ``frac_floor`` is the
row-steps per second reached over the floor (None on a device missing from the table, the CPU included).

:func:`build_case` / :func:`build_cem_case` return a zero-argument callable that runs the case once; the harness
times it. :func:`plot_throughput` draws imagined row-steps per second against N.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fastwm
from fastwm import State

from ._common import baseline_unavailable, compiled_tag, graph_unavailable, kernels_unavailable
from .bench_rssm import COMPILE_MODES, DTYPES, RSSMSize, _check_compile_mode, _model, _provider_fn, size_for
from .bench_rssm import params_on_path as _rssm_params_on_path

__all__ = [
    "BASELINES",
    "BENCHMARKS",
    "CEM",
    "CEM_PROVIDERS",
    "CEM_SIZES",
    "COMPILE_MODES",
    "DTYPES",
    "FULL_BELIEFS",
    "FULL_H",
    "FULL_N",
    "IMAGINE_BENCHMARKS",
    "PEAK_TFLOPS",
    "PROVIDERS",
    "QUICK_BELIEFS",
    "QUICK_CEM",
    "QUICK_H",
    "QUICK_N",
    "ROW_NAMES",
    "BenchCase",
    "CEMSettings",
    "all_cases",
    "build_case",
    "build_cem_case",
    "case_id",
    "cem_settings",
    "floor_row_steps_per_s",
    "flop_per_row_step",
    "footprint_bytes",
    "memory_budget_bytes",
    "params_on_path",
    "peak_tflops",
    "plot_throughput",
    "provider_unavailable",
    "reward_hidden_for",
    "row_steps",
    "size_for",
]

# ----------------------------------------------------------------------------------------------------------------------
# Peak matrix throughput: the compute floor's numerator. TFLOP/s, dense (no sparsity), per device family and the
# precision the matrix products run in ("float32" = IEEE fp32, "tf32" = float32 inputs on the TF32 tensor cores, used
# when torch.get_float32_matmul_precision() is not "highest": fastwm's kernels follow the same switch).
# The family is the longest key found in torch.cuda.get_device_name(); a device not listed (the CPU included) gets no
# floor (frac_floor None).
# ----------------------------------------------------------------------------------------------------------------------
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # H100 SXM. bfloat16 / float16: "about 800 TFLOP/s bf16 matrix product" (docs/performance.md; NVIDIA's datasheet
    # says 989 dense, 800 is what large GEMMs reach). tf32: "about half in tf32" (performance.md). float32 (IEEE, no
    # tensor cores): 67 TFLOP/s, NVIDIA H100 SXM datasheet, FP32 row.
    "H100": {"bfloat16": 800.0, "float16": 800.0, "tf32": 400.0, "float32": 67.0},
    # H100 PCIe: NVIDIA H100 datasheet, PCIe column, dense: BF16 / FP16 756, TF32 378, FP32 51.
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.0},
    # H200: the same GH100 compute as the H100 SXM (NVIDIA H200 datasheet: 989 dense BF16, 67 FP32): the H100 row.
    "H200": {"bfloat16": 800.0, "float16": 800.0, "tf32": 400.0, "float32": 67.0},
}

BENCHMARKS = ("imagine", "imagine_return", "cem_decision")
IMAGINE_BENCHMARKS = ("imagine", "imagine_return")
ROW_NAMES = {"imagine": "rssm_imagine", "imagine_return": "rssm_imagine_return", "cem_decision": "cem_decision"}
PROVIDERS = ("eager", "compiled", "graphed", "fastwm", "fastwm-graphed")
CEM_PROVIDERS = ("eager", "graphed", "fastwm", "fastwm-graphed")
CEM_ONLY = ("fastwm-graphed",)  # providers of cem_decision alone
CEM_SIZES = ("planet",)  # PlaNet's planner at PlaNet's model size
BASELINES = ("compiled", "graphed")  # speedup_vs_best_baseline: the fastest of these in the same run

FULL_N = (1000, 2500, 10000, 16384)  # Dreamer V1's 2,500 and TorchRL's 10,000 starts among them
FULL_H = (15, 50)
QUICK_N = (64, 256)
QUICK_H = (5,)
FULL_BELIEFS = (1, 16)
QUICK_BELIEFS = (1, 16)
REWARD_HIDDEN = 200
QUICK_REWARD_HIDDEN = 32
MEMORY_FRACTION = 0.5  # cases whose estimated footprint passes this fraction of the device's memory are skipped


@dataclass(frozen=True)
class CEMSettings:
    """One CEM configuration: B beliefs, each planned with ``candidates`` sequences of ``horizon`` actions, refit to
    the ``top_k`` best, ``iterations`` times per decision."""

    beliefs: int
    horizon: int = 12
    candidates: int = 1000
    top_k: int = 100
    iterations: int = 10

    @property
    def rows(self) -> int:
        """Rows imagined per iteration: B x candidates."""
        return self.beliefs * self.candidates


CEM = CEMSettings(beliefs=1)  # PlaNet: horizon 12, 1,000 candidates, top 100, 10 iterations
QUICK_CEM = CEMSettings(beliefs=1, horizon=5, candidates=100, top_k=10, iterations=3)


def cem_settings(beliefs: int, quick: bool = False) -> CEMSettings:
    """PlaNet's settings (tiny ones with ``quick``) for ``beliefs`` beliefs."""
    if beliefs < 1:
        raise ValueError(f"beliefs must be positive, got {beliefs}")
    base = QUICK_CEM if quick else CEM
    return CEMSettings(beliefs, base.horizon, base.candidates, base.top_k, base.iterations)


def reward_hidden_for(quick: bool) -> int:
    """The reward MLP's hidden width: 200 (PlaNet's), 32 at the quick sizes."""
    return QUICK_REWARD_HIDDEN if quick else REWARD_HIDDEN


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs, floor, memory
# ----------------------------------------------------------------------------------------------------------------------


def _check(benchmark: str, provider: str | None = None) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    if provider is not None and provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def _has_reward(benchmark: str) -> bool:
    return benchmark in ("imagine_return", "cem_decision")


def params_on_path(size: RSSMSize, benchmark: str, reward_hidden: int = REWARD_HIDDEN) -> int:
    """Weights one imagined row-step multiplies by: the prior path (performance.md: input (S + A) Hd, GRU (Hd + D) 3D,
    prior D Hd + Hd 2S; biases and norms left out), plus the reward MLP's (S + D) Rh + Rh when the case scores."""
    _check(benchmark)
    n = _rssm_params_on_path(size, "img_step")
    if _has_reward(benchmark):
        n += (size.stoch + size.deter) * reward_hidden + reward_hidden
    return n


def flop_per_row_step(size: RSSMSize, benchmark: str, reward_hidden: int = REWARD_HIDDEN) -> int:
    """Matrix-product FLOPs of one imagined row-step: 2 x :func:`params_on_path`."""
    return 2 * params_on_path(size, benchmark, reward_hidden)


def row_steps(benchmark: str, n: int, horizon: int, cem: CEMSettings | None = None) -> int:
    """Imagined row-steps of one call: N x H, or B x candidates x horizon x iterations for a CEM decision."""
    _check(benchmark)
    if benchmark == "cem_decision":
        if cem is None:
            raise ValueError("cem_decision needs its CEMSettings")
        return cem.rows * cem.horizon * cem.iterations
    return n * horizon


def peak_tflops(device_name: str | None, dtype: torch.dtype, fp32_matmul_precision: str = "highest") -> float | None:
    """The device's peak dense matrix TFLOP/s in the precision ``dtype``'s products run in (see
    :data:`PEAK_TFLOPS`), or None when the device is not in the table."""
    if not device_name:
        return None
    family = max((k for k in PEAK_TFLOPS if k.lower() in device_name.lower()), key=len, default=None)
    if family is None:
        return None
    if dtype == torch.float32:
        key = "float32" if fp32_matmul_precision == "highest" else "tf32"
    else:
        key = str(dtype).removeprefix("torch.")
    return PEAK_TFLOPS[family].get(key)


def floor_row_steps_per_s(flop: int, peak: float | None) -> float | None:
    """Row-steps per second at the peak matrix throughput: the compute floor of one row-step, inverted."""
    if peak is None or flop <= 0:
        return None
    return peak * 1e12 / flop


def footprint_bytes(
    benchmark: str,
    provider: str,
    size: RSSMSize,
    n: int,
    horizon: int,
    dtype: torch.dtype,
    reward_hidden: int = REWARD_HIDDEN,
    cem: CEMSettings | None = None,
) -> int:
    """A rough upper estimate of the device memory one case holds: inputs, outputs and, for the baselines, the
    per-step States kept until the stack, the stacked copy, and the features and reward activations [N, H, ...];
    doubled for compiled and graphed (buffers the compiler or the graph pool keep). Used to skip huge cases."""
    _check(benchmark, provider)
    e = torch.empty((), dtype=dtype).element_size()
    s, a, d, hd = size.stoch, size.action, size.deter, size.hidden
    if benchmark == "cem_decision":
        if cem is None:
            raise ValueError("cem_decision needs its CEMSettings")
        n, horizon = cem.rows, cem.horizon
    inputs = n * horizon * (a + s) * e + n * (d + 3 * s) * e
    if benchmark == "cem_decision":
        inputs += n * horizon * a * e  # the planner's sampling eps and candidates
    scratch = n * (4 * s + 5 * d + 3 * hd + a + 4 * max(reward_hidden, a) + 4) * 4
    if provider in ("fastwm", "fastwm-graphed"):
        out = n * horizon * (d + 3 * s) * e if benchmark == "imagine" else n * 4
        if benchmark == "cem_decision":
            out = n * 4
        total = inputs + out + scratch + n * (d + s) * e
        return total * (2 if provider == "fastwm-graphed" else 1)
    states = n * horizon * (d + 3 * s) * e
    total = inputs + 2 * states + n * (2 * hd + 6 * d + 4 * s) * e
    if _has_reward(benchmark):
        total += n * horizon * ((s + d) + reward_hidden + 1) * e + n * horizon * 4
    if provider in ("compiled", "graphed"):
        total *= 2
    return int(total)


def memory_budget_bytes(device: torch.device | str) -> int:
    """:data:`MEMORY_FRACTION` of the device's memory (of the machine's physical memory for the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            total = 16 * 2**30
    return int(MEMORY_FRACTION * total)


# ----------------------------------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------------------------------


def provider_unavailable(
    provider: str, device: torch.device | str, dtype: torch.dtype, benchmark: str | None = None
) -> str | None:
    """Why ``provider`` cannot run ``benchmark`` (any, when None) on ``device`` in ``dtype`` here, or None when it
    can."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if benchmark is not None:
        _check(benchmark)
        if benchmark == "cem_decision" and provider not in CEM_PROVIDERS:
            return f"cem_decision is timed for {', '.join(CEM_PROVIDERS)} only"
        if benchmark != "cem_decision" and provider in CEM_ONLY:
            return f"{provider} is a provider of cem_decision only"
    device = torch.device(device)
    if provider in ("eager", "compiled"):
        return baseline_unavailable(provider, device)
    if provider in ("graphed", "fastwm-graphed"):
        reason = graph_unavailable(device)
        if reason is not None or provider == "graphed":
            return reason
    return kernels_unavailable(
        device,
        dtype,
        needs=("fastwm.kernels.rollout", "the imagination kernel (kernels/rollout.py) is not in this checkout"),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Case builders
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class BenchCase:
    """One built case: ``fn()`` runs it once (asynchronously on cuda: the caller synchronizes).

    ``n`` and ``horizon`` are N and H (for cem_decision: B x candidates and the planning horizon); ``cem`` the CEM
    settings (None for imagination); ``reward_hidden`` the reward MLP's width (None without one). ``peak_mem_mb`` is
    set by the graphed provider (the capture's peak; the replay allocates nothing), None for the others.
    ``compile_mode`` is the torch.compile mode of the compiled provider, None for the others."""

    benchmark: str
    provider: str
    size: RSSMSize
    n: int
    horizon: int
    dtype: torch.dtype
    device: torch.device
    fn: Callable[[], object]
    compile_mode: str | None = None
    peak_mem_mb: float | None = None
    cem: CEMSettings | None = None
    reward_hidden: int | None = None


def _reward_mlp(size: RSSMSize, hidden: int, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Sequential:
    # PlaNet's reward head shape: Linear(S + D, hidden), ELU, Linear(hidden, 1); seeded like the model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        mlp = nn.Sequential(nn.Linear(size.stoch + size.deter, hidden), nn.ELU(), nn.Linear(hidden, 1))
    return mlp.to(device=device, dtype=dtype)


def _starts(size: RSSMSize, n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> State:
    """N random start rows: deter in (-1, 1) like a GRU state, stoch ~ N(0, 1), mean 0 and std 1."""

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    deter = randn(n, size.deter).tanh()
    stoch = randn(n, size.stoch)
    return State(deter, stoch, torch.zeros_like(stoch), torch.ones_like(stoch))


def build_case(
    benchmark: str,
    provider: str,
    size: RSSMSize,
    n: int,
    horizon: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    compile_mode: str = "max-autotune-no-cudagraphs",
    reward_hidden: int = REWARD_HIDDEN,
    seed: int = 0,
) -> BenchCase:
    """Build the model, the N seeded starts, actions [N, H, A] and noise [N, H, S] of an imagination case
    (``"imagine"`` or ``"imagine_return"``) and return the callable that runs it once.

    As in the RSSM suite: "graphed" captures its graph here (after three warm-up calls); "compiled" calls
    ``torch._dynamo.reset()`` here and compiles on the first call, so build and warm up (call ``fn`` once) one
    compiled case before building the next. Run :func:`provider_unavailable` first: "graphed" and "fastwm" raise on a
    device they cannot run on."""
    if benchmark not in IMAGINE_BENCHMARKS:
        raise ValueError(f"build_case builds {IMAGINE_BENCHMARKS}; use build_cem_case for cem_decision")
    _check(benchmark, provider)
    if provider in CEM_ONLY:
        raise ValueError(f"{provider} is a provider of cem_decision only (build_cem_case)")
    _check_compile_mode(compile_mode)
    if n < 1 or horizon < 1:
        raise ValueError(f"N and H must be positive, got N={n}, H={horizon}")
    device = torch.device(device)
    if provider == "graphed" and device.type != "cuda":
        raise ValueError("the graphed provider needs a cuda device")
    model = _model(size, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    start = _starts(size, n, gen, dtype, device)
    actions = torch.randn((n, horizon, size.action), generator=gen).tanh().to(device=device, dtype=dtype)
    noise = torch.randn((n, horizon, size.stoch), generator=gen).to(device=device, dtype=dtype)
    returns = benchmark == "imagine_return"
    reward = _reward_mlp(size, reward_hidden, dtype, device, seed) if returns else None
    hidden = reward_hidden if returns else None

    if provider == "fastwm":
        if returns:
            from fastwm.rollout import imagine_fused, pack_mlp

            packed = pack_mlp(reward, model.feature_dim, 1)
            if packed is None:  # pragma: no cover - the MLP above is plain by construction
                raise RuntimeError("the reward MLP did not pack")

            def fn() -> object:
                with torch.no_grad():
                    out = imagine_fused(
                        model.config,
                        model.weights(),
                        start.stoch,
                        start.deter,
                        horizon,
                        actions=actions,
                        reward=packed,
                        reward_sum=True,
                        write_state=False,
                        noise=noise,
                    )
                return out.ret

        else:

            def fn() -> object:
                with fastwm.backend("triton"), torch.no_grad():
                    return model.imagine(actions, start, noise)

        return BenchCase(benchmark, provider, size, n, horizon, dtype, device, fn, reward_hidden=hidden)

    if returns:

        def raw() -> object:
            dream = model.imagine(actions, start, noise)
            r = reward(model.features(dream)).squeeze(-1)  # [N, H]
            return r.to(torch.promote_types(r.dtype, torch.float32)).sum(-1)  # summed in fp32, as the planner does

    else:

        def raw() -> object:
            return model.imagine(actions, start, noise)

    fn, used_mode, peak = _provider_fn(raw, provider, device, compile_mode, "reference")
    return BenchCase(benchmark, provider, size, n, horizon, dtype, device, fn, used_mode, peak, reward_hidden=hidden)


def build_cem_case(
    provider: str,
    size: RSSMSize,
    settings: CEMSettings,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    reward_hidden: int = REWARD_HIDDEN,
    seed: int = 0,
) -> BenchCase:
    """A CEM decision: a :class:`fastwm.CEMPlanner` with ``settings`` and the reward MLP, called on a State of B random
    beliefs under the provider's backend ("eager" and "graphed": reference, "fastwm" and "fastwm-graphed": triton;
    the graphed two with ``cuda_graph=True``, captured here). Seeded by a generator on the device, so every decision
    draws fresh candidates (the same work each call)."""
    _check("cem_decision", provider)
    if provider not in CEM_PROVIDERS:
        raise ValueError(f"cem_decision runs the providers {CEM_PROVIDERS}, got {provider!r}")
    device = torch.device(device)
    if provider in ("graphed", "fastwm-graphed") and device.type != "cuda":
        raise ValueError(f"the {provider} provider needs a cuda device")
    model = _model(size, dtype, device, seed)
    reward = _reward_mlp(size, reward_hidden, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    belief = _starts(size, settings.beliefs, gen, dtype, device)
    planner_gen = torch.Generator(device=device).manual_seed(seed + 2)
    planner = fastwm.CEMPlanner(
        model,
        reward,
        horizon=settings.horizon,
        candidates=settings.candidates,
        iterations=settings.iterations,
        top_k=settings.top_k,
        warm_start=False,
        generator=planner_gen,
        cuda_graph=provider in ("graphed", "fastwm-graphed"),
    )
    backend_name = "triton" if provider in ("fastwm", "fastwm-graphed") else "reference"

    def fn() -> object:
        with fastwm.backend(backend_name), torch.no_grad():
            return planner(belief)

    if planner.cuda_graph:
        fn()  # the warm-up decisions and the capture, outside the timing

    return BenchCase(
        "cem_decision",
        provider,
        size,
        settings.rows,
        settings.horizon,
        dtype,
        device,
        fn,
        cem=settings,
        reward_hidden=reward_hidden,
    )


def case_id(
    benchmark: str,
    provider: str,
    size: RSSMSize,
    n: int,
    horizon: int,
    dtype: torch.dtype,
    compile_mode: str | None = None,
    cem: CEMSettings | None = None,
) -> str:
    """A short readable id of a case (pytest ids, progress lines)."""
    prov = compiled_tag(provider, compile_mode)
    shape = f"B{cem.beliefs}x{cem.candidates}-H{cem.horizon}" if cem is not None else f"N{n}-H{horizon}"
    return f"{ROW_NAMES[benchmark]}-{prov}-{size.name}-{shape}-{str(dtype).removeprefix('torch.')}"


def all_cases(
    benchmarks: Sequence[str], providers: Sequence[str], sizes: Sequence[str], ns: Sequence[int], hs: Sequence[int]
) -> list[tuple[str, str, str, int, int]]:
    """The imagination cross product (benchmark, provider, size name, N, H), providers innermost."""
    return [(b, p, s, n, h) for b in benchmarks for s in sizes for h in hs for n in ns for p in providers]


# ----------------------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------------------


def _label(row: dict[str, Any], several_modes: bool) -> str:
    # compiled rows are told apart by their compile mode only when the run compiled in more than one.
    mode = row.get("compile_mode")
    if row["provider"] == "compiled" and several_modes and mode != "max-autotune-no-cudagraphs":
        return {"reduce-overhead": "compiled-ro", "default": "compiled-d"}.get(mode, f"compiled[{mode}]")
    return row["provider"]


def plot_throughput(rows: Sequence[dict[str, Any]], path: Path | str) -> str | None:
    """Imagined row-steps per second against N, log-log, one line per provider, one panel per (benchmark, size) x
    (dtype, H); the compute floor and half of it dashed where the device's peak is known. Writes ``path`` (PNG,
    matplotlib's Agg canvas, no pyplot state touched). Returns None, or why nothing was drawn."""
    points = [r for r in rows if r["benchmark"] in ("rssm_imagine", "rssm_imagine_return") and r.get("row_steps_per_s")]
    if not points:
        return "plot skipped: no imagination rows"
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'fastwm[bench]')"

    row_keys = list(dict.fromkeys((r["benchmark"], r["size"]) for r in points))
    col_keys = list(dict.fromkeys((r["dtype"], r["H"]) for r in points))
    n_rows, n_cols = len(row_keys), len(col_keys)
    fig = Figure(figsize=(4.2 * n_cols, 3.4 * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    several_modes = len({r.get("compile_mode") for r in points if r["provider"] == "compiled"}) > 1

    def label(r: dict[str, Any]) -> str:
        return _label(r, several_modes)

    labels = list(dict.fromkeys(label(r) for r in points))
    styles = {lab: f"C{i}" for i, lab in enumerate(labels)}
    for i, (bench, size) in enumerate(row_keys):
        for j, (dtype, horizon) in enumerate(col_keys):
            ax = axes[i][j]
            cell = [
                r for r in points if (r["benchmark"], r["size"], r["dtype"], r["H"]) == (bench, size, dtype, horizon)
            ]
            ax.set_title(f"{bench} {size} {dtype} H={horizon}", fontsize=9)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if i == n_rows - 1:
                ax.set_xlabel("N (imagination starts)")
            if j == 0:
                ax.set_ylabel("imagined row-steps / s")
            if not cell:
                ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
                continue
            for lab in labels:
                pts = sorted((r["N"], r["row_steps_per_s"]) for r in cell if label(r) == lab)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=styles[lab], label=lab)
            ns = sorted({r["N"] for r in cell})
            ax.set_xticks(ns, labels=[f"{n:,}" for n in ns], fontsize=7)
            ax.xaxis.set_minor_formatter(NullFormatter())
            floors = [r["floor_row_steps_per_s"] for r in cell if r.get("floor_row_steps_per_s")]
            if floors:
                ax.axhline(floors[0], color="k", linestyle="--", linewidth=0.8, label="compute floor")
                ax.axhline(floors[0] / 2, color="k", linestyle=":", linewidth=0.8, label="half the floor")
            ax.legend(fontsize=7, loc="best")
    device = points[0].get("device")
    fig.suptitle(f"fastwm imagination throughput{f' on {device}' if device else ''}", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return None
