"""The benchmark harness behind ``python -m fastwm bench``: time the Gaussian, the RSSM and the imagination /
planning cases, print a table per suite, write JSON rows.

``--suite gaussian|rssm|rollout|all`` picks what runs (default: all for ``bench``; ``demo`` runs the Gaussian suite).

* gaussian: each row times one case of :mod:`fastwm.benchmarks.bench_gaussian` and reports its bandwidth against the
  device's copy bandwidth measured in the same run (``frac_copy_bw``, the goal metric: fastwm should reach at least
  80% of it and beat both the eager and the compiled baselines). Rows go to ``DIR/bench_gaussian.json``.
* rssm: each row times one case of :mod:`fastwm.benchmarks.bench_rssm` (img_step, obs_step, observe; fwd and fwd_bwd;
  eager, compiled, graphed, fastwm) and reports microseconds per sequential step, row-steps per second, matrix TFLOP/s
  and speedups against the eager and the graphed providers of the same run. Rows go to ``DIR/bench_rssm.json``.
* rollout: each row times one case of :mod:`fastwm.benchmarks.bench_rollout`: open-loop imagination of N starts over
  H steps (``rssm_imagine``; ``rssm_imagine_return`` scores it with a reward MLP and returns only the sum) for
  N in 1,000 / 2,500 / 10,000 / 16,384 and H in 15 / 50 (eager, compiled, graphed, fastwm), and one CEM decision at
  PlaNet's settings for 1 and 16 beliefs (``cem_decision``; eager, graphed, fastwm, fastwm-graphed: the planner's
  ``cuda_graph=True``). Rows report imagined row-steps per second,
  matrix TFLOP/s, the fraction of the compute floor (``frac_floor``: row-steps per second over the device's peak
  matrix throughput / FLOPs per row-step) and speedups against eager and against the best of compiled / graphed (the
  goal: at least 20x eager and 3x the best of compiled / graphed, at half the floor or better). Rows go to
  ``DIR/bench_rollout.json``; a plot of row-steps per second against N to ``DIR/rollout_throughput.png`` (needs
  matplotlib; skipped with a note without it).

Timing uses ``triton.testing.do_bench`` on cuda (median, 20th and 80th percentiles, L2 flushed between calls) and a
``time.perf_counter`` loop on the CPU. do_bench queues its L2 flush before it records the start event and calls the
function, so the host's Python and launch work overlaps the flush and never shows in the event time: for the
launch-bound rssm and rollout cases (img_step, obs_step, cem_decision, imagination at N <= 1,000) the rows' median is
instead the wall clock per call of back-to-back calls with ``torch.cuda.synchronize()`` around the loop
("wall-loop"). Every rssm and rollout row carries both figures (``device_ms``, ``wall_ms``) and names the one its
median is (``timing``). Gaussian and tune rows name theirs too.

A case that fails on cuda is followed by a ``torch.cuda.synchronize()``: when that raises too (an illegal memory
access is sticky for the process), the suite stops, its rows so far stay in ``*.partial.json``, and the command exits
with :data:`DEVICE_LOST_RC`.

triton is imported lazily, only to time on cuda: without it the fastwm provider is skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import bench_rollout, bench_rssm
from .bench_gaussian import (
    DTYPES,
    MODES,
    OPS,
    PROVIDERS,
    build_case,
    case_id,
    input_bytes,
    provider_unavailable,
)

__all__ = ["add_arguments", "copy_bandwidth_gbps", "run_from_args", "time_fn"]

SUITES = ("gaussian", "rssm", "rollout", "all")
JSON_NAME = "bench_gaussian.json"
RSSM_JSON_NAME = "bench_rssm.json"
ROLLOUT_JSON_NAME = "bench_rollout.json"
ROLLOUT_PLOT_NAME = "rollout_throughput.png"
FULL_ROWS = (1024, 65536, 1048576)
FULL_SIZES = (30, 32, 1024)
QUICK_ROWS = (256, 1024)
QUICK_SIZES = (30, 32)
MAX_INPUT_BYTES = 8 * 2**30  # cases whose inputs exceed this are skipped
GOAL_FRAC_COPY_BW = 0.8
RSSM_MIN_REPS = 10  # on cuda, do_bench's repetition time is stretched so that even slow RSSM cases get this many calls
_ROLLOUT_MODES = ("fwd",)  # imagination and planning run without gradients
GOAL_VS_EAGER = 20.0  # rollout goal: fastwm at least 20x eager,
GOAL_VS_BEST_BASELINE = 3.0  # 3x the best of compiled / graphed,
GOAL_FRAC_FLOOR = 0.5  # and at half the compute floor or better
NOTHING_TO_WARM = ("eager", "graphed")  # providers with no kernel to compile: --warm-only skips them
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEVICE_LOST_RC = 3  # exit status of a run stopped because the CUDA context was poisoned (a sticky error)
LAUNCH_BOUND_MAX_N = 1000  # imagination at this many starts or fewer is timed by the wall clock (see the docstring)
RSSM_LAUNCH_BOUND = ("img_step", "obs_step")  # single steps: one launch, or a handful, per call
WALL_LOOP_MS = 10.0  # each of the wall-clock loops runs about this long

Timing = tuple[float, float, float]  # (median, p20, p80) in milliseconds


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark options to ``parser`` (a subcommand's parser)."""
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default: bench_out)")
    parser.add_argument(
        "--suite",
        default=None,
        choices=SUITES,
        help="which benchmarks run: gaussian (DIR/bench_gaussian.json), rssm (DIR/bench_rssm.json), rollout "
        "(imagination and CEM planning: DIR/bench_rollout.json and DIR/rollout_throughput.png) or all "
        "(default: all; the demo command runs gaussian)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repetitions (always on when the device is cpu)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype",
        default=None,
        help=f"comma list of {', '.join(DTYPES)} (or fp32, bf16, fp16), run in this order (default: float32 for "
        "gaussian; bfloat16,float32 for rssm and rollout on cuda: bf16 first, the dtype performance.md's floor is "
        "defined in, so that a run cut at a time limit has it; float32 on cpu)",
    )
    parser.add_argument(
        "--providers",
        default=None,
        help=f"comma list of "
        f"{', '.join(dict.fromkeys((*PROVIDERS, *bench_rssm.PROVIDERS, *bench_rollout.PROVIDERS)))} "
        "(graphed: rssm and rollout only; fastwm-graphed: rollout's cem_decision only, which runs eager, graphed, "
        "fastwm and fastwm-graphed) "
        "(default: all; compiled is left out on cpu unless named here)",
    )
    parser.add_argument(
        "--ops",
        default=None,
        help=f"comma list of {', '.join(OPS)} (gaussian), {', '.join(bench_rssm.BENCHMARKS)} (rssm) and "
        f"{', '.join(bench_rollout.BENCHMARKS)} (rollout; or by their row names rssm_imagine, "
        "rssm_imagine_return) "
        "(default: all)",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help=f"comma list of {', '.join(MODES)} (gaussian) and {', '.join(bench_rssm.MODES)} (rssm); "
        "forward = fwd and full = fwd_bwd name the same mode in either suite; rollout has fwd only "
        "(default: all)",
    )
    parser.add_argument(
        "--rows",
        default=None,
        help="gaussian: comma list of row counts B*T (default: 1024,65536,1048576; quick: 256,1024)",
    )
    parser.add_argument(
        "--S",
        dest="sizes",
        default=None,
        help="gaussian: comma list of latent sizes S (default: 30,32,1024; quick: 30,32)",
    )
    parser.add_argument(
        "--rssm-sizes",
        default=None,
        help=f"rssm and rollout: comma list of {', '.join(bench_rssm.SIZES)} (default: all; "
        "planet: deter 200, stoch 30, hidden 200, GRU, B x T 50 x 50; dreamerv3: 512 / 32 / 512, LayerNorm GRU, "
        "16 x 64; both action 6, embed 1024; quick: tiny versions, B x T 4 x 4; rollout's cem_decision runs at "
        "planet only)",
    )
    parser.add_argument("--B", type=int, default=None, help="rssm: batch rows B of every size (default: the size's)")
    parser.add_argument(
        "--T", type=int, default=None, help="rssm: sequence length T of observe for every size (default: the size's)"
    )
    parser.add_argument(
        "--N",
        dest="rollout_n",
        default=None,
        help="rollout: comma list of imagination starts N (default: 1000,2500,10000,16384; quick: 64,256)",
    )
    parser.add_argument(
        "--H",
        dest="rollout_h",
        default=None,
        help="rollout: comma list of imagination horizons H (default: 15,50; quick: 5)",
    )
    parser.add_argument(
        "--cem-beliefs",
        default=None,
        help="rollout: comma list of belief counts B of cem_decision (default: 1,16); each is planned at PlaNet's "
        "settings: horizon 12, 1000 candidates, top 100, 10 iterations (quick: 5, 100, 10, 3)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="rssm and rollout: comma list of torch.compile modes for the compiled provider: "
        f"{', '.join(bench_rssm.COMPILE_MODES)} (default: max-autotune-no-cudagraphs; "
        "the cpu always compiles in the default mode)",
    )
    parser.add_argument(
        "--warm-only",
        action="store_true",
        help="compile, do not time: build each case and call it once (forward, and backward for fwd_bwd) so that "
        "Triton's and Inductor's on-disk caches hold its kernels; no rows, no files (what a GPU session runs in "
        "parallel processes before timing: see benchmarks/session.py)",
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="with --warm-only: I/N, this process warms cases I, I + N, I + 2N, ... of the run's case list "
        "(default: 0/1, all of them)",
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="rssm and rollout: let float32 matrix products use TF32 "
        "(torch.set_float32_matmul_precision('high'), which fastwm's kernels follow too; rows record the precision)",
    )


def _names(value: str | None, allowed: Sequence[str], what: str) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"--{what} takes a comma list of {', '.join(allowed)}; got {value!r}")
    return list(dict.fromkeys(names))


def _ints(value: str | None, default: Sequence[int], what: str) -> list[int]:
    if value is None:
        return list(default)
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or any(v <= 0 for v in out):
        raise ValueError(f"--{what} takes a comma list of positive integers; got {value!r}")
    return out


def _split_names(
    value: str | None,
    vocab: dict[str, Sequence[str]],
    what: str,
    aliases: dict[str, dict[str, str]] | None = None,
) -> dict[str, list[str] | None]:
    """A comma list shared by the suites in ``vocab`` -> per suite, the names it knows (None when ``value`` is None).

    A name may be spelled through ``aliases[suite]``; a name no suite in play knows is an error. A suite may get an
    empty list: the caller skips it."""
    if value is None:
        return {suite: None for suite in vocab}
    aliases = aliases or {}
    names = [v.strip() for v in value.split(",") if v.strip()]
    out: dict[str, list[str]] = {suite: [] for suite in vocab}
    bad = []
    for name in names:
        known = False
        for suite, allowed in vocab.items():
            canonical = aliases.get(suite, {}).get(name, name)
            if canonical in allowed:
                known = True
                if canonical not in out[suite]:
                    out[suite].append(canonical)
        if not known:
            bad.append(name)
    if bad or not names:
        allowed_all = ", ".join(dict.fromkeys(n for allowed in vocab.values() for n in allowed))
        raise ValueError(f"--{what} takes a comma list of {allowed_all}; got {value!r}")
    return dict(out)


def _dtype_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    spelled = ",".join(DTYPE_ALIASES.get(v.strip(), v.strip()) for v in value.split(","))
    return _names(spelled, tuple(DTYPES), "dtype")


# ----------------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------------


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    name = platform.processor()
    if name and name != platform.machine():
        return name
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or platform.machine() or "cpu"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def _git_commit() -> str | None:
    """HEAD of the fastwm checkout this file lives in, or None (an installed copy, or no git). FASTWM_COMMIT, when
    set, wins: a copy of the tree without its .git (a GPU machine's) names the commit it was copied from."""
    if os.environ.get("FASTWM_COMMIT"):
        return os.environ["FASTWM_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists() or not (root / "pyproject.toml").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------


def _quantile(sorted_ms: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def _quantiles(ms: list[float]) -> Timing:
    ms = sorted(ms)
    return _quantile(ms, 0.5), _quantile(ms, 0.2), _quantile(ms, 0.8)


def _time_cpu(fn: Callable[[], object], quick: bool) -> Timing:
    """A perf_counter loop: at least 5 calls, then more until the time budget (or the call cap) is spent."""
    budget_s, min_reps, max_reps = (0.2, 5, 50) if quick else (1.0, 10, 500)
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def _time_cuda_events(fn: Callable[[], object], quick: bool, min_reps: int = 0) -> Timing:
    """CUDA-event timing per call, for cuda without triton (do_bench lives in triton)."""
    reps = max(20 if quick else 100, min_reps)
    fn()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _quantiles([start.elapsed_time(end) for start, end in pairs])


def _estimate_ms(fn: Callable[[], object], calls: int = 3) -> float:
    """Wall milliseconds of one call on cuda (synchronized), averaged over a few calls."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def timing_method(device: torch.device) -> str:
    """What :func:`time_fn` measures on ``device``: "do_bench" (device time between CUDA events, L2 flushed before each
    call), "cuda-events" (the same without the flush, cuda without triton) or "perf_counter" (the CPU's wall clock)."""
    if device.type == "cuda":
        return "do_bench" if importlib.util.find_spec("triton") is not None else "cuda-events"
    return "perf_counter"


def _time_wall_loop(fn: Callable[[], object], device: torch.device, quick: bool) -> Timing:
    """(median, p20, p80) wall milliseconds per call of loops of back-to-back calls, synchronized before and after each
    loop (no flush in between): the host's Python and launch work counts, as it does for a caller calling in a loop."""
    est = max(_estimate_ms(fn, calls=2), 1e-3)
    calls = max(1, min(1000, int(WALL_LOOP_MS / est)))
    loops = 3 if quick or est > WALL_LOOP_MS else 5
    per_call = []
    for _ in range(loops):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        per_call.append((time.perf_counter() - start) * 1e3 / calls)
    return _quantiles(per_call)


def measure(fn: Callable[[], object], device: torch.device, quick: bool, launch_bound: bool,
            min_reps: int = RSSM_MIN_REPS) -> dict[str, Any]:
    """One case's timing fields: ``median_ms``, ``p20_ms``, ``p80_ms`` by the method named in ``timing``, and both
    ``device_ms`` (:func:`time_fn`'s median) and ``wall_ms`` (the wall-clock loop's). On cuda the median is the wall
    loop's for a ``launch_bound`` case ("wall-loop"), else :func:`time_fn`'s; on the CPU it is the perf_counter loop
    (a wall clock already: ``device_ms`` None)."""
    if device.type != "cuda":
        median, p20, p80 = time_fn(fn, device, quick, min_reps=min_reps)
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "timing": timing_method(device),
                "device_ms": None, "wall_ms": median}
    dev = time_fn(fn, device, quick, min_reps=min_reps)
    wall = _time_wall_loop(fn, device, quick)
    median, p20, p80 = wall if launch_bound else dev
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80,
            "timing": "wall-loop" if launch_bound else timing_method(device), "device_ms": dev[0],
            "wall_ms": wall[0]}


def time_fn(fn: Callable[[], object], device: torch.device, quick: bool, min_reps: int = 0) -> Timing:
    """(median, p20, p80) milliseconds of one call of ``fn`` on ``device``.

    ``min_reps``: on cuda, stretch do_bench's warm-up and repetition times so that at least about this many calls are
    timed (do_bench otherwise times 100 ms worth of calls, a couple of calls for a slow case)."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return _time_cuda_events(fn, quick, min_reps)
        from triton.testing import do_bench

        warmup, rep = (5, 20) if quick else (25, 100)
        if min_reps > 0:
            est = _estimate_ms(fn)
            warmup, rep = max(warmup, int(2 * est) + 1), max(rep, int(1.2 * min_reps * est) + 1)
        median, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return float(median), float(p20), float(p80)
    return _time_cpu(fn, quick)


def copy_bandwidth_gbps(device: torch.device, quick: bool) -> float:
    """GB/s of a plain device copy of a large float32 buffer (read + write): what a memory-bound op can reach."""
    n_bytes = 2**30 if device.type == "cuda" else 64 * 2**20
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    median_ms = time_fn(lambda: dst.copy_(src), device, quick)[0]
    return 2 * n_bytes / (median_ms * 1e-3) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated memory during one call above what was allocated before it, in MB (1e6 bytes); None on cpu."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 1e6


# ----------------------------------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------------------------------


def _speedups_vs(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], tuple[Any, ...]],
                 baselines: Sequence[str], field: str) -> None:
    """``row[field]``: the fastest median among the rows of the providers ``baselines`` with the row's ``key`` over
    the row's median; None where no such row ran."""
    best: dict[tuple[Any, ...], float] = {}
    for r in rows:
        if r["provider"] in baselines:
            k = key(r)
            best[k] = min(best.get(k, float("inf")), r["median_ms"])
    for r in rows:
        b = best.get(key(r))
        r[field] = b / r["median_ms"] if b is not None and r["median_ms"] > 0 else None


def _speedups(rows: list[dict[str, Any]]) -> None:
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["benchmark"], r["mode"], r["rows"], r["S"], r["dtype"]

    _speedups_vs(rows, key, ("eager",), "speedup_vs_eager")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]], copy_gbps: float) -> None:
    """The rows as a fixed-width table on stdout."""
    header = (
        f"{'benchmark':<24} {'mode':<7} {'provider':<8} {'rows':>8} {'S':>5} {'dtype':<8} {'median_ms':>10} "
        f"{'p20_ms':>9} {'p80_ms':>9} {'GB/s':>8} {'%copy':>6} {'vs_eager':>8} {'peak_MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['benchmark']:<24} {r['mode']:<7} {r['provider']:<8} {r['rows']:>8} {r['S']:>5} {r['dtype']:<8} "
            f"{r['median_ms']:>10.4f} {r['p20_ms']:>9.4f} {r['p80_ms']:>9.4f} {r['gbps']:>8.1f} "
            f"{100 * r['frac_copy_bw']:>5.1f}% {_fmt(r['speedup_vs_eager'], '>7.3g')}x "
            f"{_fmt(r['peak_mem_mb'], '>8.1f')}"
        )
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s")


def _goal_summary(rows: list[dict[str, Any]]) -> str | None:
    """How many fastwm rows reach the goal: >= 80% of copy bandwidth and faster than eager and compiled."""
    medians = {(r["benchmark"], r["mode"], r["rows"], r["S"], r["dtype"], r["provider"]): r["median_ms"] for r in rows}
    fused = [r for r in rows if r["provider"] == "fastwm"]
    if not fused:
        return None
    met = 0
    for r in fused:
        key = (r["benchmark"], r["mode"], r["rows"], r["S"], r["dtype"])
        faster = all(
            medians.get((*key, other)) is None or r["median_ms"] < medians[(*key, other)]
            for other in ("eager", "compiled")
        )
        met += int(faster and r["frac_copy_bw"] >= GOAL_FRAC_COPY_BW)
    return (
        f"goal (>= {GOAL_FRAC_COPY_BW:.0%} of copy bandwidth and faster than eager and compiled): "
        f"met by {met} of {len(fused)} fastwm rows"
    )


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_MODE_ALIASES = {
    "gaussian": {"fwd": "forward", "fwd_bwd": "full"},
    "rssm": {"forward": "fwd", "full": "fwd_bwd"},
    "rollout": {"forward": "fwd"},
}
_OP_ALIASES = {
    "rssm": {f"rssm_{b}": b for b in bench_rssm.BENCHMARKS},
    "rollout": {row: b for b, row in bench_rollout.ROW_NAMES.items()} | {"cem": "cem_decision"},
}


@dataclass
class _RolloutPlan:
    dtype_names: list[str]
    providers: list[str] | None  # None: the default set
    benchmarks: list[str]
    sizes: list[bench_rssm.RSSMSize]
    ns: list[int]
    hs: list[int]
    cem: list[bench_rollout.CEMSettings]
    reward_hidden: int
    compile_modes: list[str]
    tf32: bool


@dataclass
class _GaussianPlan:
    dtype_names: list[str]
    providers: list[str] | None  # None: the default set
    ops: list[str]
    modes: list[str]
    row_counts: list[int]
    sizes: list[int]


@dataclass
class _RSSMPlan:
    dtype_names: list[str]
    providers: list[str] | None  # None: the default set
    benchmarks: list[str]
    modes: list[str]
    sizes: list[bench_rssm.RSSMSize]
    compile_modes: list[str]
    tf32: bool


@dataclass
class _Warm:
    """--warm-only: this process's share of the cases (``index`` of ``count`` shards, dealt round-robin in run
    order) and how many of them it has warmed."""

    index: int = 0
    count: int = 1
    seen: int = 0
    warmed: int = 0

    def take(self) -> bool:
        """Whether the next case in run order is this shard's."""
        mine = self.seen % self.count == self.index
        self.seen += 1
        return mine


def parse_shard(value: str | None) -> _Warm:
    """``"I/N"`` (0 <= I < N) -> a :class:`_Warm` for shard I of N; None -> all cases."""
    if value is None:
        return _Warm()
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        index, count = -1, 0
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard takes I/N with 0 <= I < N; got {value!r}")
    return _Warm(index, count)


def _plans(
    args: argparse.Namespace, device: torch.device, quick: bool
) -> tuple[_GaussianPlan | None, _RSSMPlan | None, _RolloutPlan | None, list[str]]:
    """The suites to run and their cases, from ``args``; notes on suites left out. Raises ValueError on bad args."""
    suite = getattr(args, "suite", None) or ("gaussian" if getattr(args, "command", None) == "demo" else "all")
    if suite not in SUITES:
        raise ValueError(f"--suite takes one of {', '.join(SUITES)}; got {suite!r}")
    suites = ("gaussian", "rssm", "rollout") if suite == "all" else (suite,)
    vocab_ops = {"gaussian": OPS, "rssm": bench_rssm.BENCHMARKS, "rollout": bench_rollout.BENCHMARKS}
    vocab_providers = {"gaussian": PROVIDERS, "rssm": bench_rssm.PROVIDERS, "rollout": bench_rollout.PROVIDERS}
    vocab_modes = {"gaussian": MODES, "rssm": bench_rssm.MODES, "rollout": _ROLLOUT_MODES}
    ops = _split_names(getattr(args, "ops", None), {k: vocab_ops[k] for k in suites}, "ops", _OP_ALIASES)
    providers = _split_names(getattr(args, "providers", None), {k: vocab_providers[k] for k in suites}, "providers")
    modes = _split_names(getattr(args, "modes", None), {k: vocab_modes[k] for k in suites}, "modes", _MODE_ALIASES)
    dtype_names = _dtype_names(getattr(args, "dtype", None))

    notes: list[str] = []
    runs: dict[str, bool] = {}
    for name in suites:
        selections = (("--ops", ops), ("--providers", providers), ("--modes", modes))
        empty = [what for what, sel in selections if sel[name] == []]
        runs[name] = not empty
        if empty:
            notes.append(f"{name} suite skipped: {' and '.join(empty)} named nothing it has")
    if not any(runs.values()):
        raise ValueError("nothing to run: " + "; ".join(notes))

    gaussian = None
    if runs.get("gaussian"):
        gaussian = _GaussianPlan(
            dtype_names=dtype_names or ["float32"],
            providers=providers["gaussian"],
            ops=ops["gaussian"] or list(OPS),
            modes=modes["gaussian"] or list(MODES),
            row_counts=_ints(getattr(args, "rows", None), QUICK_ROWS if quick else FULL_ROWS, "rows"),
            sizes=_ints(getattr(args, "sizes", None), QUICK_SIZES if quick else FULL_SIZES, "S"),
        )
    rssm = None
    if runs.get("rssm"):
        size_names = _names(getattr(args, "rssm_sizes", None), tuple(bench_rssm.SIZES), "rssm-sizes")
        b, t = getattr(args, "B", None), getattr(args, "T", None)
        for flag, value in (("B", b), ("T", t)):
            if value is not None and value < 1:
                raise ValueError(f"--{flag} takes a positive integer; got {value!r}")
        compile_modes = _names(getattr(args, "compile_mode", None), bench_rssm.COMPILE_MODES, "compile-mode")
        default_dtypes = ["bfloat16", "float32"] if device.type == "cuda" else ["float32"]
        rssm = _RSSMPlan(
            dtype_names=dtype_names or default_dtypes,
            providers=providers["rssm"],
            benchmarks=ops["rssm"] or list(bench_rssm.BENCHMARKS),
            modes=modes["rssm"] or list(bench_rssm.MODES),
            sizes=[bench_rssm.size_for(n, quick, B=b, T=t) for n in (size_names or list(bench_rssm.SIZES))],
            compile_modes=compile_modes or ["max-autotune-no-cudagraphs"],
            tf32=bool(getattr(args, "tf32", False)),
        )
    rollout = None
    if runs.get("rollout"):
        size_names = _names(getattr(args, "rssm_sizes", None), tuple(bench_rssm.SIZES), "rssm-sizes")
        compile_modes = _names(getattr(args, "compile_mode", None), bench_rssm.COMPILE_MODES, "compile-mode")
        default_dtypes = ["bfloat16", "float32"] if device.type == "cuda" else ["float32"]
        beliefs = _ints(
            getattr(args, "cem_beliefs", None),
            bench_rollout.QUICK_BELIEFS if quick else bench_rollout.FULL_BELIEFS,
            "cem-beliefs",
        )
        rollout = _RolloutPlan(
            dtype_names=dtype_names or default_dtypes,
            providers=providers["rollout"],
            benchmarks=ops["rollout"] or list(bench_rollout.BENCHMARKS),
            sizes=[bench_rssm.size_for(n, quick) for n in (size_names or list(bench_rssm.SIZES))],
            ns=_ints(getattr(args, "rollout_n", None), bench_rollout.QUICK_N if quick else bench_rollout.FULL_N, "N"),
            hs=_ints(getattr(args, "rollout_h", None), bench_rollout.QUICK_H if quick else bench_rollout.FULL_H, "H"),
            cem=[bench_rollout.cem_settings(b, quick) for b in beliefs],
            reward_hidden=bench_rollout.reward_hidden_for(quick),
            compile_modes=compile_modes or ["max-autotune-no-cudagraphs"],
            tf32=bool(getattr(args, "tf32", False)),
        )
    return gaussian, rssm, rollout, notes


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); 0 on success, 1 when a case failed,
    2 on bad arguments."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch.cuda.is_available() is False")
        quick = bool(args.quick) or device.type == "cpu"
        gaussian, rssm, rollout, suite_notes = _plans(args, device, quick)
        if getattr(args, "shard", None) is not None and not getattr(args, "warm_only", False):
            raise ValueError("--shard goes with --warm-only")
        warm = parse_shard(getattr(args, "shard", None)) if getattr(args, "warm_only", False) else None
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in suite_notes:
        print(f"note: {note}")

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # so that do_bench's events and L2 flush buffer land on the chosen GPU
    meta = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": _git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    status = 0
    try:
        if gaussian is not None:
            status = max(status, _run_gaussian(gaussian, args.out, device, quick, meta, warm))
        if rssm is not None:
            if gaussian is not None:
                print()
            status = max(status, _run_rssm(rssm, args.out, device, quick, meta, warm))
        if rollout is not None:
            if gaussian is not None or rssm is not None:
                print()
            status = max(status, _run_rollout(rollout, args.out, device, quick, meta, warm))
    except DeviceLost as exc:  # every later case would fail too: the rows so far are in the *.partial.json files
        print(f"error: the device is lost, the run stops (exit {DEVICE_LOST_RC}): {exc}", file=sys.stderr)
        print(f"DEVICE LOST: {exc}", flush=True)
        return DEVICE_LOST_RC
    return status


def _default_providers(
    explicit: list[str] | None, all_providers: Sequence[str], device: torch.device, notes: list[str]
) -> list[str]:
    providers = list(explicit) if explicit is not None else list(all_providers)
    if explicit is None and device.type == "cpu":
        providers.remove("compiled")
        notes.append("compiled skipped on cpu (torch.compile is slow there): ask for it with --providers")
    providers.sort(key=list(all_providers).index)  # eager first, so that every other row has its speedup
    return providers


class DeviceLost(RuntimeError):
    """The CUDA context is poisoned (a sticky error such as an illegal memory access): every later case would fail
    too, so the suite stops; the command exits with :data:`DEVICE_LOST_RC`."""


def device_lost(device: torch.device) -> str | None:
    """After a failed case: why the device can run nothing more in this process (``torch.cuda.synchronize()`` raises
    too), or None when it is still usable (or not cuda)."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any error here means the context is gone
        return f"{type(exc).__name__}: {exc}"
    return None


def _guarded_case(name: str, device: torch.device, notes: list[str], run: Callable[..., dict | None],
                  *args: Any, **kwargs: Any) -> tuple[dict | None, bool]:
    """Run one benchmark case, ``run(*args)``: (its row, False); (None, False) when the device ran out of memory;
    (None, True) when it failed. Either way the failure is noted and the run goes on, with the memory released;
    unless the device is lost after the failure (:func:`device_lost`): then :class:`DeviceLost` is raised."""
    failure = None
    try:
        return run(*args, **kwargs), False
    except torch.OutOfMemoryError:
        notes.append(f"{name} skipped: out of device memory")
        return None, False
    except Exception as exc:  # noqa: BLE001 - one failing case must not end the run
        failure = f"{type(exc).__name__}: {exc}"
        notes.append(f"{name} FAILED: {failure}")
        return None, True
    finally:
        gc.collect()
        lost = device_lost(device) if failure is not None else None
        if lost is not None:
            notes.append(f"{name}: the device is lost after it ({lost}): the suite stops here")
            _progress(f"{name} FAILED ({failure}); the device is lost after it ({lost}): the suite stops here")
            raise DeviceLost(f"{name} FAILED ({failure}), then torch.cuda.synchronize() raised {lost}")  # noqa: B012
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _keep_case(rows: list[dict[str, Any]], name: str, progress: Callable[[dict[str, Any]], str],
               device: torch.device, notes: list[str], meta: dict[str, Any], run: Callable[..., dict | None],
               *args: Any, partial: Path | None = None, warm: _Warm | None = None, provider: str = "",
               derive: Callable[[list[dict[str, Any]]], None] | None = None) -> bool:
    """Run one case through :func:`_guarded_case`; keep its row, with the run-wide fields ``meta``, and print a
    progress line (``name: progress(row)``). With ``partial``, every row so far is rewritten there after each case
    (all their fields), so a run killed at a time limit keeps what it measured; :func:`_write_rows` removes it once
    the suite's file is written; ``derive`` (the suite's speedups) runs on a copy of the rows before each write, so
    that the partial rows have their speedup_vs_* fields. With ``warm``, only this shard's cases run, each called
    once and not timed (``run(..., warm_only=True)`` returns no row), and none of a ``provider`` that compiles nothing (eager, graphed:
    left out of the deal too, so that the shards share out the compiling cases evenly). True when the case failed."""
    if warm is not None:
        if provider in NOTHING_TO_WARM or not warm.take():
            return False
        start = time.perf_counter()
        _, failed = _guarded_case(name, device, notes, run, *args, warm_only=True)
        warm.warmed += not failed
        _progress(f"{name}: {'FAILED' if failed else 'warmed'} in {time.perf_counter() - start:.1f} s")
        return failed
    row, failed = _guarded_case(name, device, notes, run, *args)
    if row is not None:
        row.update(meta)
        rows.append(row)
        _progress(f"{name}: {progress(row)}")
        if partial is not None:
            _write_partial(rows, partial, derive)
    return failed


def _write_partial(rows: list[dict[str, Any]], partial: Path, derive: Callable[[list[dict[str, Any]]], None] | None
                   = None) -> None:
    copies = [dict(r) for r in rows]
    if derive is not None:
        derive(copies)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text(json.dumps(copies, indent=2, default=str) + "\n")


def _partial_path(out: Path, name: str) -> Path:
    """Where a suite's rows are kept while it runs (``name`` with ``.partial`` before its suffix)."""
    path = out / name
    return path.with_suffix(".partial" + path.suffix)


def _gaussian_progress(row: dict[str, Any]) -> str:
    return f"{row['median_ms']:.4f} ms, {row['gbps']:.1f} GB/s"


def _rssm_progress(row: dict[str, Any]) -> str:
    return f"{row['median_ms']:.4f} ms, {row['us_per_step']:.1f} us/step"


def _rollout_progress(row: dict[str, Any]) -> str:
    return f"{row['median_ms']:.4f} ms, {row['row_steps_per_s']:.3g} row-steps/s"


@contextlib.contextmanager
def _matmul_precision(tf32: bool) -> Iterator[None]:
    """With ``tf32``, float32 matrix products at torch's "high" precision (TF32) inside; the previous precision is
    restored after."""
    previous = torch.get_float32_matmul_precision()
    if tf32:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _print_summary_and_notes(summary: str | None, notes: list[str]) -> None:
    if summary:
        print(summary)
    for note in dict.fromkeys(notes):
        print(f"note: {note}")


def _warm_done(suite: str, warm: _Warm, notes: list[str], failures: int) -> int:
    """The end of a --warm-only suite: one line and the notes (failures among them); 0, or 1 when a case failed."""
    print(f"{suite}: warmed {warm.warmed} cases (shard {warm.index}/{warm.count}, {warm.seen} in the run so far), "
          f"{failures} failed")
    _print_summary_and_notes(None, notes)
    return 1 if failures else 0


def _write_rows(rows: list[dict[str, Any]], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(rows, indent=2) + "\n")
    _partial_path(out, name).unlink(missing_ok=True)
    print(f"wrote {len(rows)} rows to {path}")


def _run_gaussian(plan: _GaussianPlan, out: Path, device: torch.device, quick: bool, meta: dict[str, Any],
                  warm: _Warm | None = None) -> int:
    """The Gaussian suite: table, notes and DIR/bench_gaussian.json; 0, or 1 when a case failed. With ``warm``, only
    this shard's cases, compiled and not timed, and no file."""
    notes: list[str] = []
    providers = _default_providers(plan.providers, PROVIDERS, device, notes)
    copy_gbps = float("nan") if warm is not None else copy_bandwidth_gbps(device, quick)
    _progress(f"device {meta['device']} ({device}), copy bandwidth {copy_gbps:.1f} GB/s, quick={quick}")

    rows: list[dict[str, Any]] = []
    failures = 0
    skipped_reasons: set[tuple[str, str]] = set()
    run_meta = {"copy_gbps": copy_gbps, **meta}
    for dtype_name in plan.dtype_names:
        dtype = DTYPES[dtype_name]
        _note_unavailable(providers, provider_unavailable, device, dtype, dtype_name, skipped_reasons, notes)
        runnable = [p for p in providers if provider_unavailable(p, device, dtype) is None]
        for op in plan.ops:
            for mode in plan.modes:
                for n_rows in plan.row_counts:
                    for s in plan.sizes:
                        if input_bytes(op, n_rows, s, dtype) > MAX_INPUT_BYTES:
                            notes.append(f"{op} {n_rows}x{s} {dtype_name} skipped: inputs exceed 8 GiB")
                            continue
                        for provider in runnable:
                            name = case_id(op, mode, provider, n_rows, s, dtype)
                            failures += _keep_case(rows, name, _gaussian_progress, device, notes, run_meta,
                                                   _run_case, op, mode, provider, n_rows, s, dtype, device, quick,
                                                   partial=_partial_path(out, JSON_NAME), warm=warm,
                                                   provider=provider, derive=_speedups)

    if warm is not None:
        return _warm_done("gaussian", warm, notes, failures)
    for r in rows:
        r["frac_copy_bw"] = r["gbps"] / copy_gbps
    _speedups(rows)
    rows = [_ordered(r) for r in rows]
    print_table(rows, copy_gbps)
    _print_summary_and_notes(_goal_summary(rows), notes)
    _write_rows(rows, out, JSON_NAME)
    return 1 if failures else 0


_RUN_KEYS = ("device", "torch", "triton", "commit", "date")  # the run-wide fields (meta) every row ends with
_ROW_KEYS = (
    "benchmark",
    "mode",
    "provider",
    "rows",
    "S",
    "dtype",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "timing",
    "gbps",
    "copy_gbps",
    "frac_copy_bw",
    "speedup_vs_eager",
    "peak_mem_mb",
    "bytes_moved",
    *_RUN_KEYS,
)


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in _ROW_KEYS}


def _run_case(
    op: str, mode: str, provider: str, n_rows: int, s: int, dtype: torch.dtype, device: torch.device, quick: bool,
    warm_only: bool = False,
) -> dict[str, Any] | None:
    """Build, warm up (compiles and JITs), measure peak memory and time one case; the row without run-wide fields
    (``warm_only``: None after the warm-up)."""
    case = build_case(op, mode, provider, n_rows, s, dtype, device)
    case.fn()
    _sync(device)
    if warm_only:
        return None
    peak = _peak_mem_mb(case.fn, device)
    median, p20, p80 = time_fn(case.fn, device, quick)
    return {
        "benchmark": op,
        "mode": mode,
        "provider": provider,
        "rows": n_rows,
        "S": s,
        "dtype": str(dtype).removeprefix("torch."),
        "median_ms": median,
        "p20_ms": p20,
        "p80_ms": p80,
        "timing": timing_method(device),
        "gbps": case.bytes_moved / (median * 1e-3) / 1e9,
        "bytes_moved": case.bytes_moved,
        "peak_mem_mb": peak,
    }


# ----------------------------------------------------------------------------------------------------------------------
# The RSSM suite
# ----------------------------------------------------------------------------------------------------------------------

_RSSM_ROW_KEYS = (
    "benchmark",
    "mode",
    "provider",
    "compile_mode",
    "size",
    "B",
    "T",
    "deter",
    "stoch",
    "hidden",
    "embed",
    "action",
    "cell",
    "act",
    "norm",
    "std_mode",
    "initial",
    "resets",
    "dtype",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "timing",
    "device_ms",
    "wall_ms",
    "us_per_step",
    "anchor_us_per_step",
    "row_steps_per_s",
    "flop_per_row_step",
    "tflops",
    "speedup_vs_eager",
    "speedup_vs_graphed",
    "speedup_vs_fused_steps",
    "peak_mem_mb",
    "saved_bytes_per_row_step",
    "fp32_matmul_precision",
    *_RUN_KEYS,
)


def _rssm_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return r["benchmark"], r["mode"], r["size"], r["B"], r["T"], r["dtype"]


def _rssm_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_eager, _graphed and _fused_steps: the baseline's median over the row's, where both ran in this
    run."""
    for base_provider, field in (("eager", "speedup_vs_eager"), ("graphed", "speedup_vs_graphed"),
                                 ("fused-steps", "speedup_vs_fused_steps")):
        _speedups_vs(rows, _rssm_key, (base_provider,), field)


def _provider_label(r: dict[str, Any], device_type: str) -> str:
    short = {"reduce-overhead": "compiled-ro", "default": "compiled-d"}
    if r["provider"] == "compiled" and r["compile_mode"] in short and device_type == "cuda":
        return short[r["compile_mode"]]
    return r["provider"]


def print_rssm_table(rows: list[dict[str, Any]], device_type: str = "cuda") -> None:
    """The RSSM rows as a fixed-width table on stdout (provider compiled-ro: mode reduce-overhead, compiled-d: the
    default mode; plain compiled: max-autotune-no-cudagraphs on cuda, the default mode on the cpu)."""
    header = (
        f"{'benchmark':<16} {'mode':<7} {'provider':<11} {'size':<9} {'BxT':>7} {'dtype':<8} {'median_ms':>10} "
        f"{'p20_ms':>9} {'p80_ms':>9} {'us/step':>9} {'rowstep/s':>9} {'TFLOP/s':>7} {'vs_eager':>8} "
        f"{'vs_graph':>8} {'peak_MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['benchmark']:<16} {r['mode']:<7} {_provider_label(r, device_type):<11} {r['size']:<9} "
            f"{str(r['B']) + 'x' + str(r['T']):>7} {r['dtype']:<8} {r['median_ms']:>10.4f} {r['p20_ms']:>9.4f} "
            f"{r['p80_ms']:>9.4f} {r['us_per_step']:>9.1f} {_fmt(r['row_steps_per_s'], '>9.3g')} "
            f"{_fmt(r['tflops'], '>7.3g')} "
            f"{_fmt(r['speedup_vs_eager'], '>7.3g')}x {_fmt(r['speedup_vs_graphed'], '>7.3g')}x "
            f"{_fmt(r['peak_mem_mb'], '>8.1f')}"
        )


def _rssm_summary(rows: list[dict[str, Any]]) -> str | None:
    """How many fastwm rows beat every baseline of the same case measured in this run."""
    fused = [r for r in rows if r["provider"] == "fastwm"]
    if not fused:
        return None
    best: dict[tuple[Any, ...], float] = {}
    for r in rows:
        if r["provider"] in bench_rssm.BASELINES:
            key = _rssm_key(r)
            best[key] = min(best.get(key, float("inf")), r["median_ms"])
    met = sum(int(r["median_ms"] < best.get(_rssm_key(r), float("inf"))) for r in fused)
    return (f"fastwm faster than every baseline measured ({', '.join(bench_rssm.BASELINES)}): {met} of {len(fused)} "
            "fastwm rows")


def _note_unavailable(providers: Sequence[str], unavailable: Callable[..., str | None], device: torch.device,
                      dtype: torch.dtype, dtype_name: str, seen: set[tuple[str, str]], notes: list[str]) -> None:
    """One note per (provider, reason) for the providers that cannot run at this dtype on this device."""
    for provider in providers:
        reason = unavailable(provider, device, dtype)
        if reason is not None and (provider, reason) not in seen:
            seen.add((provider, reason))
            notes.append(f"{provider} skipped ({dtype_name}): {reason}")


def _run_rssm(plan: _RSSMPlan, out: Path, device: torch.device, quick: bool, meta: dict[str, Any],
              warm: _Warm | None = None) -> int:
    """The RSSM suite: table, notes and DIR/bench_rssm.json; 0, or 1 when a case failed. With ``warm``, only this
    shard's cases, compiled and not timed, and no file."""
    notes: list[str] = []
    providers = _default_providers(plan.providers, bench_rssm.PROVIDERS, device, notes)
    if "observe" in plan.benchmarks:
        notes.append(
            f"observe: anchor_us_per_step is performance.md's anchor, {bench_rssm.ANCHOR_US_PER_STEP['fwd']} us per "
            f"step forward and {bench_rssm.ANCHOR_US_PER_STEP['fwd_bwd']} us forward+backward for the best recurrent "
            "kernels known (cuDNN LSTM, FlashRNN) at batch 16, hidden 768, on an H100: set beside, not the same model"
        )
        notes.append(
            "observe: every provider gets the same posterior noise; the prior's sample noise is drawn inside the call "
            "(no prior_noise is given, as in training): by torch.randn in the reference (eager, compiled, graphed)"
        )
    rows: list[dict[str, Any]] = []
    failures = 0
    skipped_reasons: set[tuple[str, str]] = set()
    with _matmul_precision(plan.tf32):
        _progress(
            f"device {meta['device']} ({device}), rssm sizes {', '.join(s.name for s in plan.sizes)}, quick={quick}, "
            f"float32 matmul precision {torch.get_float32_matmul_precision()}"
        )
        for dtype_name in plan.dtype_names:
            dtype = DTYPES[dtype_name]
            unavailable = bench_rssm.provider_unavailable
            _note_unavailable(providers, unavailable, device, dtype, dtype_name, skipped_reasons, notes)
            runnable = [p for p in providers if unavailable(p, device, dtype) is None]
            variants = [(p, m) for p in runnable for m in (plan.compile_modes if p == "compiled" else [None])]
            for benchmark in plan.benchmarks:
                for mode in plan.modes:
                    for size in plan.sizes:
                        for provider, compile_mode in variants:
                            if provider in bench_rssm.OBSERVE_ONLY and benchmark != "observe":
                                continue
                            name = bench_rssm.case_id(benchmark, mode, provider, size, dtype, compile_mode)
                            failures += _keep_case(rows, name, _rssm_progress, device, notes, meta, _run_rssm_case,
                                                   benchmark, mode, provider, size, dtype, device, quick, compile_mode,
                                                   partial=_partial_path(out, RSSM_JSON_NAME), warm=warm,
                                                   provider=provider, derive=_rssm_speedups)

    if warm is not None:
        return _warm_done("rssm", warm, notes, failures)
    _rssm_speedups(rows)
    rows = [{k: r[k] for k in _RSSM_ROW_KEYS} for r in rows]
    print_rssm_table(rows, device.type)
    _print_summary_and_notes(_rssm_summary(rows), notes)
    _write_rows(rows, out, RSSM_JSON_NAME)
    return 1 if failures else 0


def _run_rssm_case(
    benchmark: str,
    mode: str,
    provider: str,
    size: bench_rssm.RSSMSize,
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
    compile_mode: str | None,
    warm_only: bool = False,
) -> dict[str, Any] | None:
    """Build (the graphed provider captures here), warm up (compiles), measure peak memory and time one RSSM case;
    the row without run-wide fields (``warm_only``: None after the warm-up)."""
    kwargs = {} if compile_mode is None else {"compile_mode": compile_mode}
    case = bench_rssm.build_case(benchmark, mode, provider, size, dtype, device, **kwargs)
    case.fn()
    _sync(device)
    if warm_only:
        return None
    peak = case.peak_mem_mb if case.peak_mem_mb is not None else _peak_mem_mb(case.fn, device)
    timing = measure(case.fn, device, quick, benchmark in RSSM_LAUNCH_BOUND)
    median = timing["median_ms"]
    steps = bench_rssm.steps_per_call(size, benchmark)
    flop = bench_rssm.flop_per_row_step(size, benchmark, mode)
    n_row_steps = bench_rssm.row_steps(size, benchmark)
    seconds = median * 1e-3
    return {
        "benchmark": f"rssm_{benchmark}",
        "mode": mode,
        "provider": provider,
        "compile_mode": case.compile_mode,
        "size": size.name,
        "B": size.B,
        "T": steps,
        "deter": size.deter,
        "stoch": size.stoch,
        "hidden": size.hidden,
        "embed": size.embed,
        "action": size.action,
        "cell": size.cell,
        "act": size.act,
        "norm": size.norm,
        "std_mode": size.std_mode,
        "initial": size.initial,
        "resets": bench_rssm.OBSERVE_RESETS if benchmark == "observe" else None,
        "dtype": str(dtype).removeprefix("torch."),
        **timing,
        "us_per_step": median * 1e3 / steps,
        "anchor_us_per_step": bench_rssm.ANCHOR_US_PER_STEP[mode] if benchmark == "observe" else None,
        "row_steps_per_s": n_row_steps / seconds if seconds > 0 else None,
        "flop_per_row_step": flop,
        "tflops": flop * n_row_steps / seconds / 1e12 if seconds > 0 else None,
        "peak_mem_mb": peak,
        "saved_bytes_per_row_step": bench_rssm.saved_bytes_per_row_step(size, dtype, benchmark, mode, provider),
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# The rollout suite: imagination and planning
# ----------------------------------------------------------------------------------------------------------------------

_ROLLOUT_ROW_KEYS = (
    "benchmark",
    "provider",
    "compile_mode",
    "size",
    "N",
    "H",
    "beliefs",
    "candidates",
    "top_k",
    "iterations",
    "deter",
    "stoch",
    "hidden",
    "action",
    "cell",
    "act",
    "norm",
    "std_mode",
    "reward_hidden",
    "dtype",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "timing",
    "device_ms",
    "wall_ms",
    "row_steps",
    "row_steps_per_s",
    "flop_per_row_step",
    "tflops",
    "peak_tflops",
    "floor_row_steps_per_s",
    "frac_floor",
    "speedup_vs_eager",
    "speedup_vs_best_baseline",
    "best_baseline",
    "baselines_measured",
    "peak_mem_mb",
    "fp32_matmul_precision",
    *_RUN_KEYS,
)


def _rollout_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return r["benchmark"], r["size"], r["N"], r["H"], r["beliefs"], r["dtype"]


def _baseline_label(r: dict[str, Any]) -> str:
    return f"compiled[{r['compile_mode']}]" if r["provider"] == "compiled" else r["provider"]


def _rollout_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_eager: eager's median over the row's; speedup_vs_best_baseline: the fastest of compiled (any compile
    mode) and graphed over the row's; None where the baseline did not run in this run. ``baselines_measured``: the
    baselines (compiled with its mode in brackets) that ran for the row's case, ``best_baseline`` the fastest of
    them (the one speedup_vs_best_baseline is against; None when none ran)."""
    _speedups_vs(rows, _rollout_key, ("eager",), "speedup_vs_eager")
    _speedups_vs(rows, _rollout_key, bench_rollout.BASELINES, "speedup_vs_best_baseline")
    measured: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if r["provider"] in bench_rollout.BASELINES:
            measured.setdefault(_rollout_key(r), []).append(r)
    for r in rows:
        base = measured.get(_rollout_key(r), [])
        r["baselines_measured"] = sorted({_baseline_label(b) for b in base})
        r["best_baseline"] = _baseline_label(min(base, key=lambda b: b["median_ms"])) if base else None


def print_rollout_table(rows: list[dict[str, Any]], device_type: str = "cuda") -> None:
    """The rollout rows as a fixed-width table on stdout (N x H: starts x horizon; for cem_decision beliefs x
    candidates and the horizon; %floor: row-steps per second over the compute floor's; vs_best: against the fastest
    of compiled and graphed)."""
    header = (
        f"{'benchmark':<19} {'provider':<11} {'size':<9} {'N x H':>12} {'dtype':<8} {'median_ms':>10} "
        f"{'p20_ms':>9} {'p80_ms':>9} {'rowstep/s':>9} {'TFLOP/s':>7} {'%floor':>7} {'vs_eager':>8} "
        f"{'vs_best':>8} {'peak_MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        starts = f"{r['beliefs']}x{r['candidates']}" if r["beliefs"] is not None else str(r["N"])
        frac = None if r["frac_floor"] is None else 100 * r["frac_floor"]
        print(
            f"{r['benchmark']:<19} {_provider_label(r, device_type):<11} {r['size']:<9} "
            f"{starts + 'x' + str(r['H']):>12} {r['dtype']:<8} {r['median_ms']:>10.4f} {r['p20_ms']:>9.4f} "
            f"{r['p80_ms']:>9.4f} {_fmt(r['row_steps_per_s'], '.3g'):>9} {_fmt(r['tflops'], '.3g'):>7} "
            f"{_fmt(frac, '.2f'):>6}% {_fmt(r['speedup_vs_eager'], '.3g'):>7}x "
            f"{_fmt(r['speedup_vs_best_baseline'], '.3g'):>7}x {_fmt(r['peak_mem_mb'], '.1f'):>8}"
        )


def _cem_summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per CEM setting and dtype: each provider's milliseconds per decision and its speedup over eager."""
    lines = []
    groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["benchmark"] == "cem_decision":
            groups.setdefault((r["beliefs"], r["candidates"], r["H"], r["dtype"]), {})[r["provider"]] = r
    for (beliefs, candidates, horizon, dtype), by_provider in groups.items():
        parts = [f"{p} {r['median_ms']:.3g} ms" + (f" ({r['speedup_vs_eager']:.3g}x eager)"
                                                   if p != "eager" and r["speedup_vs_eager"] is not None else "")
                 for p, r in by_provider.items()]
        lines.append(f"cem_decision, {beliefs} belief(s) x {candidates} candidates, horizon {horizon}, {dtype}: "
                     + ", ".join(parts))
    return lines


def _rollout_summary(rows: list[dict[str, Any]]) -> str | None:
    """How many fastwm imagination rows reach the goal: >= 20x eager, >= 3x the best of compiled / graphed, at half
    the compute floor or better (a criterion whose baseline or floor is missing from the run counts as not met)."""
    fused = [r for r in rows if r["provider"] == "fastwm" and r["benchmark"] != "cem_decision"]
    if not fused:
        return None
    checks = (
        ("speedup_vs_eager", GOAL_VS_EAGER),
        ("speedup_vs_best_baseline", GOAL_VS_BEST_BASELINE),
        ("frac_floor", GOAL_FRAC_FLOOR),
    )

    def compiled_measured(r: dict[str, Any]) -> bool:
        return any(b.startswith("compiled") for b in r.get("baselines_measured") or ())

    passes = [r for r in fused if all(r[f] is not None and r[f] >= goal for f, goal in checks)]
    met = sum(compiled_measured(r) for r in passes)
    without_compiled = [r for r in fused if not compiled_measured(r)]
    missing = {f for r in fused for f, _ in checks if r[f] is None}
    line = (
        f"goal (>= {GOAL_VS_EAGER:g}x eager, >= {GOAL_VS_BEST_BASELINE:g}x the best of compiled / graphed, "
        f">= {GOAL_FRAC_FLOOR:.0%} of the compute floor): met by {met} of {len(fused)} fastwm imagination rows"
    )
    if without_compiled:
        others = sorted({b for r in without_compiled for b in r.get("baselines_measured") or ()})
        line += (f"; compiled was not measured for {len(without_compiled)} of them, which are not counted as met "
                 f"({len(passes) - met} of those pass against {' / '.join(others) or 'no baseline'} alone)")
    if missing:
        line += f" (not measured in this run for some rows: {', '.join(sorted(missing))})"
    return line


def _rollout_cases(
    plan: _RolloutPlan, providers: list[str], device: torch.device, dtype: torch.dtype, notes: list[str]
) -> list[dict[str, Any]]:
    """The cases of one dtype, in run order: each a dict of build_case / build_cem_case arguments plus its id."""
    cases: list[dict[str, Any]] = []
    budget = bench_rollout.memory_budget_bytes(device)
    dtype_name = str(dtype).removeprefix("torch.")
    for benchmark in plan.benchmarks:
        usable = [p for p in providers if bench_rollout.provider_unavailable(p, device, dtype, benchmark) is None]
        variants = [(p, m) for p in usable for m in (plan.compile_modes if p == "compiled" else [None])]
        if benchmark == "cem_decision":
            sizes = [s for s in plan.sizes if s.name in bench_rollout.CEM_SIZES]
            if not sizes:
                notes.append(f"cem_decision runs at the {', '.join(bench_rollout.CEM_SIZES)} size only: not asked for")
            left_out = [
                p
                for p in providers
                if p not in bench_rollout.CEM_PROVIDERS and bench_rollout.provider_unavailable(p, device, dtype) is None
            ]
            if left_out:
                notes.append(
                    f"cem_decision is timed for {', '.join(bench_rollout.CEM_PROVIDERS)} only "
                    f"(not {', '.join(left_out)})"
                )
            shapes = [(s, c.rows, c.horizon, c) for s in sizes for c in plan.cem]
        else:
            shapes = [(s, n, h, None) for s in plan.sizes for h in plan.hs for n in plan.ns]
        for size, n, h, cem in shapes:
            for provider, compile_mode in variants:
                name = bench_rollout.case_id(benchmark, provider, size, n, h, dtype, compile_mode, cem)
                need = bench_rollout.footprint_bytes(benchmark, provider, size, n, h, dtype, plan.reward_hidden, cem)
                if need > budget:
                    notes.append(
                        f"{name} skipped: its estimated footprint, {need / 1e9:.1f} GB, passes "
                        f"{bench_rollout.MEMORY_FRACTION:.0%} of the {device.type} memory ({budget / 1e9:.1f} GB)"
                    )
                    continue
                cases.append(
                    {
                        "name": name,
                        "benchmark": benchmark,
                        "provider": provider,
                        "compile_mode": compile_mode,
                        "size": size,
                        "n": n,
                        "h": h,
                        "cem": cem,
                        "dtype_name": dtype_name,
                    }
                )
    return cases


def _run_rollout(plan: _RolloutPlan, out: Path, device: torch.device, quick: bool, meta: dict[str, Any],
                 warm: _Warm | None = None) -> int:
    """The rollout suite: table, notes, DIR/bench_rollout.json and DIR/rollout_throughput.png; 0, or 1 when a case
    failed. With ``warm``, only this shard's cases, compiled and not timed, and no file."""
    notes: list[str] = []
    providers = _default_providers(plan.providers, bench_rollout.PROVIDERS, device, notes)
    if "cem_decision" in plan.benchmarks:
        notes.append(
            "cem_decision: the planner draws its candidates and its imagination noise inside the call "
            "(torch.randn per step in eager, in-kernel Philox in fastwm); the imagination cases are given their noise"
        )
    rows: list[dict[str, Any]] = []
    failures = 0
    skipped_reasons: set[tuple[str, str]] = set()
    with _matmul_precision(plan.tf32):
        _progress(
            f"device {meta['device']} ({device}), rollout sizes {', '.join(s.name for s in plan.sizes)}, "
            f"N {','.join(map(str, plan.ns))}, H {','.join(map(str, plan.hs))}, quick={quick}, "
            f"float32 matmul precision {torch.get_float32_matmul_precision()}"
        )
        for dtype_name in plan.dtype_names:
            dtype = DTYPES[dtype_name]
            unavailable = bench_rollout.provider_unavailable
            _note_unavailable(providers, unavailable, device, dtype, dtype_name, skipped_reasons, notes)
            for case in _rollout_cases(plan, providers, device, dtype, notes):
                failures += _keep_case(rows, case["name"], _rollout_progress, device, notes, meta, _run_rollout_case,
                                       case, plan, dtype, device, quick, partial=_partial_path(out, ROLLOUT_JSON_NAME),
                                       warm=warm, provider=case["provider"], derive=_rollout_speedups)

    if warm is not None:
        return _warm_done("rollout", warm, notes, failures)
    _rollout_speedups(rows)
    rows = [{k: r[k] for k in _ROLLOUT_ROW_KEYS} for r in rows]
    print_rollout_table(rows, device.type)
    if rows and all(r["frac_floor"] is None for r in rows):
        notes.append(
            f"frac_floor not computed: no peak matrix throughput known for {meta['device']} "
            f"(bench_rollout.PEAK_TFLOPS lists {', '.join(bench_rollout.PEAK_TFLOPS)})"
        )
    out.mkdir(parents=True, exist_ok=True)
    plot_path = out / ROLLOUT_PLOT_NAME
    try:
        plot_note = bench_rollout.plot_throughput(rows, plot_path)
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the measurements
        plot_note = f"plot failed: {type(exc).__name__}: {exc}"
    if plot_note:
        notes.append(plot_note)
    summary = "\n".join(line for line in (_rollout_summary(rows), *_cem_summary(rows)) if line)
    _print_summary_and_notes(summary or None, notes)
    _write_rows(rows, out, ROLLOUT_JSON_NAME)
    if plot_note is None:
        print(f"wrote the throughput plot to {plot_path}")
    return 1 if failures else 0


def _run_rollout_case(
    case: dict[str, Any], plan: _RolloutPlan, dtype: torch.dtype, device: torch.device, quick: bool,
    warm_only: bool = False,
) -> dict[str, Any] | None:
    """Build (the graphed provider captures here), warm up (compiles), measure peak memory and time one rollout case;
    the row without run-wide fields (``warm_only``: None after the warm-up)."""
    benchmark, provider, size, cem = case["benchmark"], case["provider"], case["size"], case["cem"]
    if benchmark == "cem_decision":
        built = bench_rollout.build_cem_case(provider, size, cem, dtype, device, reward_hidden=plan.reward_hidden)
    else:
        kwargs = {} if case["compile_mode"] is None else {"compile_mode": case["compile_mode"]}
        built = bench_rollout.build_case(
            benchmark, provider, size, case["n"], case["h"], dtype, device, reward_hidden=plan.reward_hidden, **kwargs
        )
    built.fn()
    _sync(device)
    if warm_only:
        return None
    peak = built.peak_mem_mb if built.peak_mem_mb is not None else _peak_mem_mb(built.fn, device)
    timing = measure(built.fn, device, quick, benchmark == "cem_decision" or built.n <= LAUNCH_BOUND_MAX_N)
    median = timing["median_ms"]
    n_row_steps = bench_rollout.row_steps(benchmark, built.n, built.horizon, cem)
    flop = bench_rollout.flop_per_row_step(size, benchmark, plan.reward_hidden)
    precision = torch.get_float32_matmul_precision()
    peak_tflops = bench_rollout.peak_tflops(_device_name(device) if device.type == "cuda" else None, dtype, precision)
    floor = bench_rollout.floor_row_steps_per_s(flop, peak_tflops)
    seconds = median * 1e-3
    rate = n_row_steps / seconds if seconds > 0 else None
    return {
        "benchmark": bench_rollout.ROW_NAMES[benchmark],
        "provider": provider,
        "compile_mode": built.compile_mode,
        "size": size.name,
        "N": built.n,
        "H": built.horizon,
        "beliefs": None if cem is None else cem.beliefs,
        "candidates": None if cem is None else cem.candidates,
        "top_k": None if cem is None else cem.top_k,
        "iterations": None if cem is None else cem.iterations,
        "deter": size.deter,
        "stoch": size.stoch,
        "hidden": size.hidden,
        "action": size.action,
        "cell": size.cell,
        "act": size.act,
        "norm": size.norm,
        "std_mode": size.std_mode,
        "reward_hidden": built.reward_hidden,
        "dtype": str(dtype).removeprefix("torch."),
        **timing,
        "row_steps": n_row_steps,
        "row_steps_per_s": rate,
        "flop_per_row_step": flop,
        "tflops": flop * rate / 1e12 if rate is not None else None,
        "peak_tflops": peak_tflops,
        "floor_row_steps_per_s": floor,
        "frac_floor": rate / floor if rate is not None and floor is not None else None,
        "peak_mem_mb": peak,
        "fp32_matmul_precision": precision,
    }
