"""Compile every fastwm Triton kernel for a GPU target ahead of time, on a machine without a GPU.

The Triton interpreter checks what the kernels compute but never runs Triton's compiler: a kernel that computes the
right values under TRITON_INTERPRET=1 can still fail to compile for a GPU (tl.dot in bf16 or fp64, a layout the
compiler rejects), or spill registers. This tool drives the public API through every kernel variant (each cell kind,
each dtype, the step, observe, imagination, rollout and planner paths, forward and backward) with a stand-in driver
whose target is an NVIDIA GPU, so that each launch compiles to a cubin instead of running. The cubins are then read
with the ``cuobjdump`` that ships inside the triton wheel: registers, local memory (spills) and shared memory per
kernel variant.

    python -m benchmarks.aot                  # sm_90 (H100 / H200), every variant, a table
    python -m benchmarks.aot --arch 80 --json aot.json

Outputs never hold values (no kernel runs): only compilation is checked. It needs triton but no GPU and no CUDA
toolkit; TRITON_INTERPRET must not be set (the interpreter never compiles).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

__all__ = ["CompiledVariant", "compile_all", "main"]

DTYPES = ("float32", "bfloat16", "float16", "float64")
CELLS = ("gru", "layernorm_gru", "none")
SIZES = ((30, 200, 200), (32, 512, 512))  # stoch / deter / hidden: PlaNet's and dreamerv3's (alignment differs)
SPILL_FREE_STACK = 32  # bytes per thread: the frame of a seeded (Philox) draw, present without any spill


@dataclass
class CompiledVariant:
    """One compiled kernel variant and what its cubin uses per thread / per program."""

    kernel: str
    scenario: str
    constexprs: str
    num_warps: int
    registers: int | None
    local_bytes: int | None  # per thread: local memory outside the stack
    stack_bytes: int | None  # per thread: the stack frame, where spilled registers go (32 B: a Philox draw's own)
    shared_bytes: int
    seconds: float


class _TargetDriver:
    """A stand-in for Triton's active driver: reports ``target`` and never touches a device."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def _constexpr_summary(kernel) -> str:
    names = ("CELL", "ACT", "NORM", "POST", "COMPUTE", "NOISE", "NOISE_Q", "NOISE_P", "STD_MODE", "HAS_FIRST", "MODE",
             "OPEN_LOOP", "POLICY_LAYERS", "REWARD", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_S")
    src = getattr(kernel, "src", None)
    consts = getattr(src, "constants", None) or {}
    parts = []
    for key, value in consts.items():
        name = key if isinstance(key, str) else None
        if name is None and isinstance(key, tuple) and src is not None:
            try:
                name = src.fn.arg_names[key[0]]
            except (AttributeError, IndexError):
                name = None
        if name is not None and (name in names or name.startswith(("HAS_", "STORE_", "SAVE_", "WRITE_"))):
            parts.append(f"{name}={value}")
    return " ".join(parts)


@contextmanager
def _compile_only(arch: int, record: Callable[[str, object, float], None]) -> Iterator[None]:
    """Every Triton launch compiles for ``arch`` and returns without running; fastwm routes CPU tensors to Triton."""
    from triton.runtime import jit as tjit
    from triton.runtime.driver import driver

    import fastwm._backend as fb

    original_run, original_interp = tjit.JITFunction.run, fb.interpreter_enabled

    def run(self, *args, grid, warmup, **kwargs):
        n_before = sum(len(c[0]) for c in self.device_caches.values())
        start = time.perf_counter()
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if sum(len(c[0]) for c in self.device_caches.values()) > n_before:
            record(self.fn.__name__, kernel, time.perf_counter() - start)
        return kernel

    previous = driver._active  # None until something asked for the real driver (none exists without a GPU)
    driver.set_active(_TargetDriver(arch))
    tjit.JITFunction.run = run
    fb.interpreter_enabled = lambda: True
    try:
        yield
    finally:
        tjit.JITFunction.run = original_run
        fb.interpreter_enabled = original_interp
        driver._active = previous


@contextmanager
def _feature_split(programs: int) -> Iterator[None]:
    """observe's forward loop with its features split over up to ``programs`` programs (compiled, never run)."""
    from fastwm.kernels import observe

    saved = observe.FEATURE_SPLIT, observe.INTERPRETER_RUNS_PROGRAMS_CONCURRENTLY
    observe.FEATURE_SPLIT, observe.INTERPRETER_RUNS_PROGRAMS_CONCURRENTLY = programs, True
    try:
        yield
    finally:
        observe.FEATURE_SPLIT, observe.INTERPRETER_RUNS_PROGRAMS_CONCURRENTLY = saved


@contextmanager
def _rollout_tiles(open_loop: tuple[int, int, int], closed_loop: tuple[int, int, int]) -> Iterator[None]:
    """The rollout launched with these (BLOCK_M, BLOCK_N, BLOCK_K): those a GPU picks for thousands of starts (on the
    CPU, where the scenarios' tensors live, it always picks 16 rows)."""
    from fastwm.kernels import rollout

    saved = rollout._rollout_tiles
    rollout._rollout_tiles = lambda n, device, closed, narrow=False, reward=False: closed_loop if closed else open_loop
    try:
        yield
    finally:
        rollout._rollout_tiles = saved


@contextmanager
def _as_gpu(sms: int = 132) -> Iterator[None]:
    """Launch-size choices as a GPU of ``sms`` multiprocessors (an H100 / H200: 132) makes them: the rollout's row
    block and tiles, and observe's feature-split programs, instead of the CPU's (16 rows, no split)."""
    import functools

    from fastwm.kernels import observe, rollout

    saved = rollout._rollout_tiles, observe.split_programs
    tiles = functools.partial(rollout._rollout_tiles, sms=sms)
    programs = functools.partial(observe.split_programs, sms=sms)
    rollout._rollout_tiles, observe.split_programs = tiles, programs
    try:
        yield
    finally:
        rollout._rollout_tiles, observe.split_programs = saved


def _session_scenarios() -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, thunk): what ``benchmarks.session`` times on a GPU, at its full sizes: the fastwm and recompute cases
    of bench observe, the rollout cases (imagine, imagine_return, CEM) and every tune variant, bf16 and fp32."""
    import torch

    from . import bench_rollout, bench_rssm, tune
    from .harness import _Warm

    cpu = torch.device("cpu")
    dtypes = (torch.bfloat16, torch.float32)

    def observe(dt: torch.dtype) -> None:
        for size in (bench_rssm.size_for(n) for n in bench_rssm.SIZES):
            for mode in bench_rssm.MODES:
                for provider in ("fastwm", "recompute"):
                    bench_rssm.build_case("observe", mode, provider, size, dt, cpu).fn()

    def rollout(dt: torch.dtype) -> None:
        hidden = bench_rollout.reward_hidden_for(False)
        for size in (bench_rssm.size_for(n) for n in bench_rssm.SIZES):
            for benchmark in ("imagine", "imagine_return"):
                for n in (1000, 10000):
                    bench_rollout.build_case(benchmark, "fastwm", size, n, 15, dt, cpu, reward_hidden=hidden).fn()
        for beliefs in bench_rollout.FULL_BELIEFS:
            bench_rollout.build_cem_case("fastwm", bench_rssm.size_for("planet"), bench_rollout.cem_settings(beliefs),
                                         dt, cpu, reward_hidden=hidden).fn()

    def tune_all(dt: torch.dtype) -> None:
        failed = tune.run(cpu, False, tune.KINDS, warm=_Warm(), dtypes=(dt,))
        if failed:
            raise RuntimeError("; ".join(f"{r['case']} {r['variant']}: {r['error'][:200]}" for r in failed))

    for dt in dtypes:
        name = str(dt).removeprefix("torch.")
        yield f"session observe {name}", lambda dt=dt: observe(dt)
        yield f"session rollout {name}", lambda dt=dt: rollout(dt)
        yield f"session tune {name}", lambda dt=dt: tune_all(dt)


def _resources(cubin: bytes, tool: str) -> tuple[int | None, int | None, int | None]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=False).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", out)
    if m is None:
        return None, None, None
    return int(m.group(1)), int(m.group(3)), int(m.group(2))


def _scenarios(dtypes: tuple[str, ...], cells: tuple[str, ...],
               sizes: tuple[tuple[int, int, int], ...]) -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, thunk): each thunk calls the public API on CPU tensors, forward and backward."""
    import torch
    from torch import nn

    import fastwm

    def gaussian(dt: torch.dtype) -> None:
        q = torch.randn(5, 8, 32, dtype=dt, requires_grad=True)
        p = torch.randn(5, 8, 32, dtype=dt, requires_grad=True)
        out = fastwm.gaussian_head_sample_kl(q, p, mode="softplus")
        (out.sample.sum() + out.kl.sum()).backward()
        m, s = torch.randn(5, 8, 16, dtype=dt), torch.rand(5, 8, 16, dtype=dt) + 0.5
        fastwm.gaussian_sample_kl(m, s, m, s, torch.randn_like(m))
        fastwm.std_from_raw(q.detach().requires_grad_(), mode="sigmoid2").sum().backward()
        fastwm.kl_loss(m, s, m, s, **fastwm.KL_PRESETS["dreamerv3"])

    def cells_fn(dt: torch.dtype) -> None:
        x, h = torch.randn(5, 48, dtype=dt, requires_grad=True), torch.randn(5, 64, dtype=dt, requires_grad=True)
        gru = nn.GRUCell(48, 64).to(dt)
        fastwm.gru_cell(x, h, gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh).sum().backward()
        ln = fastwm.LayerNormGRUCell(48, 64).to(dt)
        ln(x, h).sum().backward()

    def rssm(dt: torch.dtype, cell: str, sizes: tuple[int, int, int]) -> None:
        stoch, deter, hidden = sizes
        m = fastwm.RSSM(6, 96, stoch=stoch, deter=deter, hidden=hidden, cell=cell, norm=cell == "layernorm_gru",
                        dtype=dt)
        b, t_len = 5, 3
        emb, act = torch.randn(b, t_len, 96, dtype=dt), torch.randn(b, t_len, 6, dtype=dt)
        first = torch.zeros(b, t_len, dtype=torch.bool)
        post, prior, kl = m.observe(emb, act, first, return_kl=True)
        (post.stoch.sum() + prior.mean.sum() + kl.sum() + post.deter.sum()).backward() if cell != "none" else \
            (post.stoch.sum() + prior.mean.sum() + kl.sum()).backward()
        with _feature_split(8):  # the forward and reverse loops with their features split
            post, prior, kl = m.observe(emb, act, first, return_kl=True)
            (post.stoch.sum() + prior.mean.sum() + kl.sum()).backward()
        if cell != "none":  # both loops with resets to a learned initial state
            ml = fastwm.RSSM(6, 96, stoch=stoch, deter=deter, hidden=hidden, cell=cell, norm=cell == "layernorm_gru",
                             initial="learned", dtype=dt)
            for split in (1, 8):
                with _feature_split(split):
                    post, prior, kl = ml.observe(emb, act, first, return_kl=True)
                    (post.stoch.sum() + kl.sum()).backward()
        state = m.initial(b)
        post1, prior1 = m.obs_step(state, act[:, 0], emb[:, 0])
        (post1.stoch.sum() + prior1.std.sum()).backward()
        m.img_step(state, act[:, 0]).stoch.sum().backward()
        with torch.no_grad():
            m.imagine(torch.randn(b, 4, 6, dtype=dt), state)
            m.imagine(torch.randn(b, 4, 6, dtype=dt), state, torch.randn(b, 4, stoch, dtype=dt))
            policy = nn.Sequential(nn.Linear(m.feature_dim, 32), nn.ELU(), nn.Linear(32, 6), nn.Tanh()).to(dt)
            m.rollout(policy, state, 4)
            reward = nn.Sequential(nn.Linear(m.feature_dim, 32), nn.ELU(), nn.Linear(32, 1)).to(dt)
            fastwm.CEMPlanner(m, reward, horizon=3, candidates=32, top_k=4, iterations=2)(m.initial(2))
            fastwm.MPPIPlanner(m, reward, horizon=3, samples=32, iterations=2)(m.initial(2))
            fastwm.CEMPlanner(m, lambda f: f.sum(-1), horizon=3, candidates=32, top_k=4, iterations=1,
                              stochastic=False)(m.initial(2))
            # the row blocks and tiles a GPU picks for launches over thousands of starts (this dtype's): imagination
            # with features, the planners' return-only rollout, and the closed loop
            from fastwm.kernels.rollout import _narrow, _tile_candidates

            narrow = _narrow(dt, torch.device("cuda"), deter, hidden)
            opened, closed = _tile_candidates(False, narrow), _tile_candidates(True, narrow)
            for i, tiles in enumerate(opened):
                with _rollout_tiles(tiles, closed[min(i, len(closed) - 1)]):
                    m.imagine(torch.randn(b, 4, 6, dtype=dt), state)
                    fastwm.CEMPlanner(m, reward, horizon=3, candidates=32, top_k=4, iterations=1)(m.initial(2))
                    if i < len(closed):
                        m.rollout(policy, state, 4)

    for name in dtypes:
        dt = getattr(torch, name)
        yield f"gaussian {name}", lambda dt=dt: gaussian(dt)
        yield f"cells {name}", lambda dt=dt: cells_fn(dt)
        for cell in cells:
            for size in sizes:
                yield (f"rssm {cell} {name} {'/'.join(map(str, size))}",
                       lambda dt=dt, cell=cell, size=size: rssm(dt, cell, size))


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = DTYPES, cells: tuple[str, ...] = CELLS,
                sizes: tuple[tuple[int, int, int], ...] = SIZES, log: Callable[[str], None] | None = None,
                session: bool = False) -> tuple[list[CompiledVariant], list[tuple[str, str]]]:
    """Compile every kernel variant the scenarios reach (``session``: instead, those of the GPU session, with a GPU's
    launch-size choices); returns (variants, failures as (scenario, error))."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("benchmarks.aot compiles kernels: unset TRITON_INTERPRET (the interpreter never compiles)")
    import torch
    import triton

    import fastwm

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    variants: list[CompiledVariant] = []
    failures: list[tuple[str, str]] = []
    current = [""]

    def record(name: str, kernel, seconds: float) -> None:
        regs, local, stack = _resources(kernel.asm["cubin"], tool) if os.path.exists(tool) else (None, None, None)
        variants.append(CompiledVariant(name, current[0], _constexpr_summary(kernel), kernel.metadata.num_warps,
                                        regs, local, stack, kernel.metadata.shared, round(seconds, 2)))
        if log is not None:
            v = variants[-1]
            log(f"  {name:28s} regs {v.registers} local {v.local_bytes} stack {v.stack_bytes} shared {v.shared_bytes} "
                f"({v.seconds:.1f} s) {v.constexprs}")

    torch.manual_seed(0)
    validate = fastwm.get_validate_args()
    fastwm.set_validate_args(False)  # the outputs of a compile-only launch hold no values
    try:
        scenarios = _session_scenarios() if session else _scenarios(dtypes, cells, sizes)
        with _compile_only(arch, record), fastwm.backend("triton"), _as_gpu() if session else contextlib.nullcontext():
            for name, thunk in scenarios:
                current[0] = name
                if log is not None:
                    log(name)
                try:
                    thunk()
                except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the others
                    failures.append((name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
                    if log is not None:
                        log(f"  FAILED {failures[-1][1]}")
    finally:
        fastwm.set_validate_args(validate)
    return variants, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    parser.add_argument("--sizes", nargs="+", default=["/".join(map(str, s)) for s in SIZES],
                        help="stoch/deter/hidden triples (default: %(default)s)")
    parser.add_argument("--json", default=None, help="write the variants and failures here")
    parser.add_argument("--session", action="store_true",
                        help="compile what benchmarks.session times on a GPU instead (bench observe and rollout at "
                        "their full sizes, every tune variant; bf16 and fp32), with an H100's launch-size choices: "
                        "whether each compiles, its registers and spills, and the compile seconds phase 1 must hold")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sizes = tuple(tuple(int(x) for x in s.split("/")) for s in args.sizes)
    variants, failures = compile_all(args.arch, tuple(args.dtypes), tuple(args.cells), sizes,
                                     log=None if args.quiet else print, session=args.session)
    # Spilled registers land in the stack frame; a seeded (in-kernel Philox) draw leaves a 32-byte frame by itself.
    spilling = sorted((v for v in variants if (v.stack_bytes or 0) > SPILL_FREE_STACK or v.local_bytes),
                      key=lambda v: -(v.stack_bytes or 0))
    capped = sum(v.registers == 255 for v in variants)
    print(f"sm_{args.arch}: {len(variants)} kernel variants compiled in {time.perf_counter() - start:.0f} s "
          f"({sum(v.seconds for v in variants):.0f} s of compilation), "
          f"{len(failures)} scenario(s) failed, {capped} at the 255-register cap, {len(spilling)} with a stack "
          f"frame over {SPILL_FREE_STACK} bytes (register spills)")
    for v in spilling[:8]:
        print(f"  stack {v.stack_bytes} B: {v.kernel} ({v.scenario}) {v.constexprs}")
    for name, err in failures:
        print(f"FAILED {name}: {err}")
    if args.json:
        import torch
        import triton

        from .harness import _git_commit

        meta = {"arch": f"sm_{args.arch}", "device": "none: compiled on the CPU for the target, never run",
                "torch": torch.__version__, "triton": triton.__version__, "commit": _git_commit(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dtypes": args.dtypes,
                "cells": args.cells, "sizes": args.sizes, "session": args.session}
        with open(args.json, "w") as f:
            json.dump({**meta, "variants": [asdict(v) for v in variants],
                       "failures": [{"scenario": s, "error": e} for s, e in failures]}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
