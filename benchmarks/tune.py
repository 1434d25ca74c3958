"""Time the kernels' launch configurations against each other in one call: what a GPU session runs first.

The tile sizes and warp counts in ``fastwm.kernels`` were chosen without a GPU, from the sm_90 compile
(``benchmarks.aot``: registers and spills). This times the alternatives on the device at hand, each case once per
variant in the same run, and prints each variant's median beside the current default's:

* observe forward+backward (dreamerv3 16 x 64 and planet 50 x 50; fp32 and bf16) and forward alone (dreamerv3)
  with 4 and 8 warps for the time loops (``NUM_WARPS_STEP``), three product tiles for them (``LOOP_BLOCK_N`` x
  ``LOOP_BLOCK_K``), and the forward loop's feature split over 8 to 32 programs per row block (``FEATURE_SPLIT``;
  the default, 0, is the row split);
* imagine (dreamerv3, H = 15, N = 2,500 and 16,384; bf16 and fp32) over the rollout's row-block and tile choices
  and the two warp counts;
* the CEM decision at PlaNet's settings with 4 and 8 warps;
* in every case, observe's forward loops and the step backward with ptxas's own register ceiling instead of 255
  (``MAXNREG``).

    python -m benchmarks.tune --out DIR            # DIR/tune.json: one row per (case, variant), and a table

On the CPU it runs the same variants at tiny sizes under TRITON_INTERPRET=1 (a smoke test: interpreter timings say
nothing about the GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .harness import _Warm, parse_shard

__all__ = ["Variant", "variants_for", "main"]

DEFAULT = "default"
KINDS = ("observe", "imagine", "cem")


@dataclass(frozen=True)
class Variant:
    """A launch configuration: the warps of the fused step / loop kernels and, for the rollout, fixed tiles
    (BLOCK_M, BLOCK_N, BLOCK_K) instead of the size-based choice. None keeps the default."""

    name: str
    num_warps_step: int | None = None
    rollout_tiles: tuple[int, int, int] | None = None
    observe_tiles: tuple[int, int] | None = None  # (BLOCK_N, BLOCK_K) of observe's two time loops
    feature_split: int | None = None  # observe's FEATURE_SPLIT: programs per row block of the forward loop
    maxnreg: int | None = None  # MAXNREG of observe's forward loops and the step backward; 0: none (ptxas's own)


def variants_for(case: str) -> list[Variant]:
    """The variants timed for a case kind ("observe", "imagine" or "cem"); the first is the current default."""
    warps = [Variant(DEFAULT), Variant("warps4", num_warps_step=4), Variant("warps8", num_warps_step=8),
             Variant("ptxas-regs", maxnreg=0)]
    if case == "observe":
        return warps + [Variant(f"loop{n}x{k}-w{w}", num_warps_step=w, observe_tiles=(n, k))
                        for n, k in ((64, 32), (32, 32), (32, 16)) for w in (4, 8)] + \
            [Variant(f"split{p}-loop{n}x16", feature_split=p, observe_tiles=(n, 16))
             for p, n in ((8, 32), (16, 32), (16, 16), (32, 16))]
    if case != "imagine":
        return warps
    tiles = [(16, 64, 32), (32, 16, 16), (32, 32, 32), (64, 32, 32), (128, 16, 16)]
    return warps + [Variant(f"tiles{m}x{n}x{k}-w{w}", num_warps_step=w, rollout_tiles=(m, n, k))
                    for m, n, k in tiles for w in (4, 8)]


@contextlib.contextmanager
def _launch_config(v: Variant) -> Iterator[None]:
    """Set a variant's warps and tiles in the kernel modules (each imported the constants by name), then restore."""
    from fastwm.kernels import observe, rollout, rssm

    saved = [(m, "NUM_WARPS_STEP", m.NUM_WARPS_STEP) for m in (rssm, observe, rollout)]
    saved += [(m, "MAXNREG", m.MAXNREG) for m in (rssm, observe)]
    saved += [(rollout, "_rollout_tiles", rollout._rollout_tiles), (observe, "LOOP_BLOCK_N", observe.LOOP_BLOCK_N),
              (observe, "LOOP_BLOCK_K", observe.LOOP_BLOCK_K), (observe, "FEATURE_SPLIT", observe.FEATURE_SPLIT)]
    try:
        if v.num_warps_step is not None:
            for m, _, _ in saved[:3]:
                m.NUM_WARPS_STEP = v.num_warps_step
        if v.maxnreg is not None:
            for m, _, _ in saved[3:5]:
                m.MAXNREG = v.maxnreg or None
        if v.rollout_tiles is not None:
            rollout._rollout_tiles = lambda *args, t=v.rollout_tiles: t
        if v.observe_tiles is not None:
            observe.LOOP_BLOCK_N, observe.LOOP_BLOCK_K = v.observe_tiles
        if v.feature_split is not None:
            observe.FEATURE_SPLIT = v.feature_split
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def _settings() -> tuple[Any, ...]:
    """The launch settings the kernel modules hold now (what :func:`_launch_config` changes)."""
    from fastwm.kernels import observe, rollout, rssm

    return (tuple(m.NUM_WARPS_STEP for m in (rssm, observe, rollout)), rssm.MAXNREG, observe.MAXNREG,
            rollout._rollout_tiles, observe.LOOP_BLOCK_N, observe.LOOP_BLOCK_K, observe.FEATURE_SPLIT)


def same_as_default(v: Variant) -> bool:
    """Whether variant ``v`` launches exactly what the default does (e.g. 8 warps when 8 is the default): its kernels
    are the default's, so warming it again would only compile them twice."""
    before = _settings()
    with _launch_config(v):
        return _settings() == before


def _cases(device: torch.device, quick: bool,
           dtypes: tuple[torch.dtype, ...] | None = None) -> Iterator[tuple[str, str, dict[str, Any], Any]]:
    """(kind, name, row fields, builder): builder() returns the zero-argument callable that runs the case once.
    ``dtypes``: default bfloat16 and float32 on cuda, float32 on the CPU."""
    from . import bench_rollout, bench_rssm

    if dtypes is None:
        dtypes = (torch.float32,) if device.type == "cpu" else (torch.bfloat16, torch.float32)
    for dtype in dtypes:
        dn = str(dtype).removeprefix("torch.")
        for size_name, mode in (("dreamerv3", "fwd_bwd"), ("planet", "fwd_bwd"), ("dreamerv3", "fwd")):
            size = bench_rssm.size_for(size_name, quick)
            yield ("observe", f"observe {mode} {size_name} {size.B}x{size.T} {dn}",
                   {"benchmark": "rssm_observe", "provider": "fastwm", "mode": mode, "size": size_name, "B": size.B,
                    "T": size.T, "dtype": dn, "deter": size.deter, "hidden": size.hidden},
                   lambda size=size, dtype=dtype, mode=mode: bench_rssm.build_case("observe", mode, "fastwm", size,
                                                                                   dtype, device).fn)
        size = bench_rssm.size_for("dreamerv3", quick)
        for n in (bench_rollout.QUICK_N if quick else (2500, 16384)):
            h = bench_rollout.QUICK_H[0] if quick else 15
            yield ("imagine", f"imagine dreamerv3 N{n} H{h} {dn}",
                   {"benchmark": "rssm_imagine", "provider": "fastwm", "size": "dreamerv3", "N": n, "H": h,
                    "dtype": dn},
                   lambda n=n, h=h, dtype=dtype, size=size: bench_rollout.build_case(
                       "imagine", "fastwm", size, n, h, dtype, device).fn)
    size = bench_rssm.size_for("planet", quick)
    settings = bench_rollout.cem_settings(1, quick)
    yield ("cem", f"cem_decision planet {settings.candidates} candidates float32",
           {"benchmark": "cem_decision", "provider": "fastwm", "size": "planet", "beliefs": settings.beliefs,
            "candidates": settings.candidates, "horizon": settings.horizon, "top_k": settings.top_k,
            "iterations": settings.iterations, "dtype": "float32"},
           lambda: bench_rollout.build_cem_case("fastwm", size, settings, torch.float32, device).fn)


def _chosen(v: Variant, split: bool, prefixes: tuple[str, ...] | None) -> bool:
    """Whether variant ``v`` runs: no feature split without ``split``; with ``prefixes``, only the variants whose
    names start with one of them."""
    if v.feature_split and not split:
        return False
    return prefixes is None or v.name.startswith(prefixes)


def run(device: torch.device, quick: bool, kinds: tuple[str, ...], split: bool = True,
        warm: _Warm | None = None, partial: Path | None = None,
        prefixes: tuple[str, ...] | None = None, meta: dict[str, Any] | None = None,
        dtypes: tuple[torch.dtype, ...] | None = None) -> list[dict[str, Any]]:
    """Time every variant of every case (without ``split``, none of the feature-split ones; with ``prefixes``, those
    whose names start with one of them, the default always included when timing: the ratios are to it); rows carry
    median / p20 / p80 ms and the ratio to the default's median. With ``warm``, only that shard's (case, variant)
    pairs, each compiled and run once, not timed: no rows. With ``partial``, the rows so far, with the run-wide
    fields ``meta``, are rewritten there after each variant (a run stopped at a time limit keeps them)."""
    if prefixes is not None and warm is None:
        prefixes = (DEFAULT, *prefixes)
    import fastwm

    from .harness import _sync, device_lost, time_fn, timing_method

    rows: list[dict[str, Any]] = []
    cases = [c for c in _cases(device, quick, dtypes) if c[0] in kinds]
    base: dict[str, float] = {}

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps([{**r, **(meta or {})} for r in rows], indent=1, default=str) + "\n")

    # The feature-split variants go last, after every other (case, variant): their grid barriers are the likeliest
    # to hang, and a hang must not cost the other measurements.
    for split_pass in (False, True):
        for kind, name, fields, build in cases:
            for v in variants_for(kind):
                if bool(v.feature_split) != split_pass or not _chosen(v, split, prefixes):
                    continue
                if warm is not None and (v.name != DEFAULT and same_as_default(v) or not warm.take()):
                    continue  # the default's kernels are warmed under its own name
                with _launch_config(v), fastwm.backend("triton"):
                    try:
                        fn = build()
                        fn()  # compile and warm up outside the timing
                        _sync(device)
                        if warm is not None:
                            warm.warmed += 1
                            print(f"{name:48s} {v.name:22s} warmed", flush=True)
                            continue
                        median, p20, p80 = time_fn(fn, device, quick)
                    except Exception as exc:  # noqa: BLE001 - a variant that fails is reported, the others go on
                        print(f"{name:48s} {v.name:22s} FAILED {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120]}", flush=True)
                        error = {**fields, "case": name, "variant": v.name, "error": f"{type(exc).__name__}: {exc}"}
                        lost = device_lost(device)  # an illegal memory access is sticky: nothing more can run
                        if lost is not None:
                            print(f"the device is lost after {name} {v.name} ({lost}): tune stops here", flush=True)
                            keep({**error, "device_lost": lost})
                            return rows
                        keep(error)
                        continue
                if kind == "observe":  # the programs per row block the forward loop really ran with
                    from fastwm.kernels import observe

                    with _launch_config(v):
                        fields = {**fields, "split_programs": observe.split_programs(fields["B"], fields["deter"],
                                                                                     fields["hidden"], device)}
                if v.name == DEFAULT:
                    base[name] = median
                ratio = base[name] / median if base.get(name) else None
                keep({**fields, "case": name, "variant": v.name, "num_warps_step": v.num_warps_step,
                      "rollout_tiles": v.rollout_tiles, "observe_tiles": v.observe_tiles,
                      "feature_split": v.feature_split, "maxnreg": v.maxnreg, "median_ms": median,
                      "p20_ms": p20, "p80_ms": p80, "timing": timing_method(device), "speedup_vs_default": ratio})
                print(f"{name:48s} {v.name:22s} {median:10.4f} ms  x{ratio:.3f} vs default" if ratio else
                      f"{name:48s} {v.name:22s} {median:10.4f} ms", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.tune``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tune_out", help="output folder (DIR/tune.json)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--kinds", default="observe,imagine,cem", help="comma list of observe, imagine, cem")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (always on the CPU)")
    parser.add_argument("--no-split", action="store_true", help="leave out observe's feature-split variants")
    parser.add_argument("--variants", default=None,
                        help="comma list of variant-name prefixes (e.g. warps,split): only those variants run, and "
                        "the default, when timing (default: all)")
    parser.add_argument("--warm-only", action="store_true",
                        help="compile, do not time: run each (case, variant) once so that Triton's cache holds its "
                        "kernels; no rows, no file (a GPU session runs this in parallel processes first)")
    parser.add_argument("--shard", default=None, help="with --warm-only: I/N, this process's share of the "
                        "(case, variant) pairs, dealt round-robin (default: 0/1, all)")
    return parser


def check_args(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...] | None, _Warm | None]:
    """(kinds, variant-name prefixes or None, the warm shard or None) from parsed arguments; ValueError naming the
    option when one is off."""
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"--kinds takes a comma list of {', '.join(KINDS)}; got {args.kinds!r}")
    if args.shard is not None and not args.warm_only:
        raise ValueError("--shard goes with --warm-only")
    prefixes = None
    if args.variants is not None:
        prefixes = tuple(p.strip() for p in args.variants.split(",") if p.strip())
        known = [v.name for k in kinds for v in variants_for(k)]
        if not prefixes or any(not any(n.startswith(p) for n in known) for p in prefixes):
            raise ValueError(f"--variants takes a comma list of prefixes of {', '.join(dict.fromkeys(known))}; "
                             f"got {args.variants!r}")
    warm = parse_shard(args.shard) if args.warm_only else None
    return kinds, prefixes, warm


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or device.type == "cpu"
    try:
        kinds, prefixes, warm = check_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    from .harness import DEVICE_LOST_RC, _device_name, _git_commit, _triton_version

    if warm is not None:
        rows = run(device, quick, kinds, split=not args.no_split, warm=warm, prefixes=prefixes)
        print(f"tune: warmed {warm.warmed} (case, variant) pairs (shard {warm.index}/{warm.count} of {warm.seen})")
        if any("device_lost" in r for r in rows):
            return DEVICE_LOST_RC
        return 1 if rows else 0  # in warm mode the rows are the failures

    meta = {"device": _device_name(device), "torch": torch.__version__, "triton": _triton_version(),
            "commit": _git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quick": quick}
    print(f"tune on {meta['device']} ({device}), quick={quick}")
    out = Path(args.out)
    partial = out / "tune.partial.json"
    rows = run(device, quick, kinds, split=not args.no_split, partial=partial, prefixes=prefixes, meta=meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps([{**r, **meta} for r in rows], indent=1) + "\n")
    partial.unlink(missing_ok=True)
    print(f"wrote {len(rows)} rows to {out / 'tune.json'}")
    if any("device_lost" in r for r in rows):
        return DEVICE_LOST_RC  # the rows stop where the device was lost
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
