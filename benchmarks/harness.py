"""The benchmark harness behind ``python -m fastwm bench``: time the Gaussian cases, print a table, write JSON rows.

Each row times one case of :mod:`fastwm.benchmarks.bench_gaussian` and reports its bandwidth against the device's
copy bandwidth measured in the same run (``frac_copy_bw``, the goal metric: fastwm should reach at least 80% of it and
beat both the eager and the compiled baselines). Timing uses ``triton.testing.do_bench`` on cuda (median, 20th and
80th percentiles, L2 flushed between calls) and a ``time.perf_counter`` loop on the CPU.

triton is imported lazily, only to time on cuda: without it the fastwm provider is skipped with a note.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

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

__all__ = ["add_arguments", "run_from_args", "time_fn", "copy_bandwidth_gbps"]

JSON_NAME = "bench_gaussian.json"
FULL_ROWS = (1024, 65536, 1048576)
FULL_SIZES = (30, 32, 1024)
QUICK_ROWS = (256, 1024)
QUICK_SIZES = (30, 32)
MAX_INPUT_BYTES = 8 * 2**30  # cases whose inputs exceed this are skipped
GOAL_FRAC_COPY_BW = 0.8

Timing = tuple[float, float, float]  # (median, p20, p80) in milliseconds


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark options to ``parser`` (a subcommand's parser)."""
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default: bench_out)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repetitions (always on when the device is cpu)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="float32", help=f"comma list of {', '.join(DTYPES)} (default: float32)")
    parser.add_argument(
        "--providers",
        default=None,
        help=f"comma list of {', '.join(PROVIDERS)} (default: all; compiled is left out on cpu unless named here)",
    )
    parser.add_argument("--ops", default=None, help=f"comma list of {', '.join(OPS)} (default: all)")
    parser.add_argument("--modes", default=None, help=f"comma list of {', '.join(MODES)} (default: all)")
    parser.add_argument(
        "--rows", default=None, help="comma list of row counts B*T (default: 1024,65536,1048576; quick: 256,1024)"
    )
    parser.add_argument(
        "--S", dest="sizes", default=None, help="comma list of latent sizes S (default: 30,32,1024; quick: 30,32)"
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
    """HEAD of the fastwm checkout this file lives in, or None (an installed copy, or no git)."""
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


def _time_cuda_events(fn: Callable[[], object], quick: bool) -> Timing:
    """CUDA-event timing per call, for cuda without triton (do_bench lives in triton)."""
    reps = 20 if quick else 100
    fn()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _quantiles([start.elapsed_time(end) for start, end in pairs])


def time_fn(fn: Callable[[], object], device: torch.device, quick: bool) -> Timing:
    """(median, p20, p80) milliseconds of one call of ``fn`` on ``device``."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return _time_cuda_events(fn, quick)
        from triton.testing import do_bench

        kwargs = {"warmup": 5, "rep": 20} if quick else {}
        median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], **kwargs)
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


def _speedups(rows: list[dict[str, Any]]) -> None:
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["benchmark"], r["mode"], r["rows"], r["S"], r["dtype"]

    eager = {key(r): r["median_ms"] for r in rows if r["provider"] == "eager"}
    for r in rows:
        base = eager.get(key(r))
        r["speedup_vs_eager"] = base / r["median_ms"] if base is not None and r["median_ms"] > 0 else None


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


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); 0 on success, 1 when a case failed,
    2 on bad arguments."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch.cuda.is_available() is False")
        dtype_names = _names(args.dtype, tuple(DTYPES), "dtype") or ["float32"]
        explicit = _names(args.providers, PROVIDERS, "providers")
        ops = _names(args.ops, OPS, "ops") or list(OPS)
        modes = _names(args.modes, MODES, "modes") or list(MODES)
        quick = bool(args.quick) or device.type == "cpu"
        row_counts = _ints(args.rows, QUICK_ROWS if quick else FULL_ROWS, "rows")
        sizes = _ints(args.sizes, QUICK_SIZES if quick else FULL_SIZES, "S")
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    notes: list[str] = []
    providers = explicit if explicit is not None else list(PROVIDERS)
    if explicit is None and device.type == "cpu":
        providers.remove("compiled")
        notes.append("compiled skipped on cpu (torch.compile is slow there): ask for it with --providers")
    providers.sort(key=PROVIDERS.index)  # eager first, so that every other row has its speedup

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # so that do_bench's events and L2 flush buffer land on the chosen GPU
    meta = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": _git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    copy_gbps = copy_bandwidth_gbps(device, quick)
    _progress(f"device {meta['device']} ({device}), copy bandwidth {copy_gbps:.1f} GB/s, quick={quick}")

    rows: list[dict[str, Any]] = []
    failures = 0
    skipped_reasons: set[tuple[str, str]] = set()
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        for provider in providers:
            reason = provider_unavailable(provider, device, dtype)
            if reason is not None and (provider, reason) not in skipped_reasons:
                skipped_reasons.add((provider, reason))
                notes.append(f"{provider} skipped ({dtype_name}): {reason}")
        runnable = [p for p in providers if provider_unavailable(p, device, dtype) is None]
        for op in ops:
            for mode in modes:
                for n_rows in row_counts:
                    for s in sizes:
                        if input_bytes(op, n_rows, s, dtype) > MAX_INPUT_BYTES:
                            notes.append(f"{op} {n_rows}x{s} {dtype_name} skipped: inputs exceed 8 GiB")
                            continue
                        for provider in runnable:
                            name = case_id(op, mode, provider, n_rows, s, dtype)
                            try:
                                row = _run_case(op, mode, provider, n_rows, s, dtype, device, quick)
                            except torch.OutOfMemoryError:
                                notes.append(f"{name} skipped: out of device memory")
                                row = None
                            except Exception as exc:  # noqa: BLE001 - one failing case must not end the run
                                failures += 1
                                notes.append(f"{name} FAILED: {type(exc).__name__}: {exc}")
                                row = None
                            finally:
                                gc.collect()
                                if device.type == "cuda":
                                    torch.cuda.empty_cache()
                            if row is None:
                                continue
                            row.update(copy_gbps=copy_gbps, frac_copy_bw=row["gbps"] / copy_gbps, **meta)
                            rows.append(row)
                            _progress(f"{name}: {row['median_ms']:.4f} ms, {row['gbps']:.1f} GB/s")

    _speedups(rows)
    rows = [_ordered(r) for r in rows]
    print_table(rows, copy_gbps)
    summary = _goal_summary(rows)
    if summary:
        print(summary)
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / JSON_NAME
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {len(rows)} rows to {path}")
    return 1 if failures else 0


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
    "gbps",
    "copy_gbps",
    "frac_copy_bw",
    "speedup_vs_eager",
    "peak_mem_mb",
    "bytes_moved",
    "device",
    "torch",
    "triton",
    "commit",
    "date",
)


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in _ROW_KEYS}


def _run_case(
    op: str, mode: str, provider: str, n_rows: int, s: int, dtype: torch.dtype, device: torch.device, quick: bool
) -> dict[str, Any]:
    """Build, warm up (compiles and JITs), measure peak memory and time one case; the row without run-wide fields."""
    case = build_case(op, mode, provider, n_rows, s, dtype, device)
    case.fn()
    _sync(device)
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
        "gbps": case.bytes_moved / (median * 1e-3) / 1e9,
        "bytes_moved": case.bytes_moved,
        "peak_mem_mb": peak,
    }
