"""The whole GPU session in one command that fits a lent machine's budget: correctness on cuda first, then the
headline timings, each part under its own time limit and all of them under one deadline.

A task that draws a GPU gets 15 minutes of device time in all, the machine's start (a minute or more) included, and
one command may run 10 minutes: a single call of this, with a deadline well inside the command's limit, is the session.

    FASTWM_COMMIT=<sha> python3 -m benchmarks.session --out "$OUT"   # on the GPU machine, from a checkout (540 s)
    python -m benchmarks.session --dry-run                             # the plan, its arguments checked
    python -m benchmarks.session --smoke --out DIR                     # the same machinery on the CPU, tiny

Phase 1 runs in parallel, because its cost is compilation, on the CPU cores:

* ``tests``: pytest ``--device cuda`` over the kernel tests of observe, rollout, the step and planning, and beside
  it ``tests-more`` over rssm, gaussian, kl, elbo, compile, backend and validation (``--test-workers`` processes
  between them);
* ``split``: observe's feature-split test alone (its programs meet at grid barriers that have never run on a GPU;
  a hang is killed at its limit), then, if it passed, the split's tune variants compiled (``split-warm-*``);
* ``warm-*``: ``--warm-only --shard I/W`` of every case phase 2 times (``fastwm bench`` and ``benchmarks.tune``): each
  kernel variant compiled once into Triton's on-disk cache (and Inductor's, for the compiled provider), so the timing
  processes find them there instead of compiling one after another.

Phase 2 runs one step at a time (timings must not share the GPU), in this order, each skipped once too little time is
left: ``observe`` (bench rssm observe: both sizes, fp32 and bf16, fwd and fwd_bwd; eager, graphed, fused-steps,
fastwm, recompute), ``rollout`` (imagine and imagine_return at N 1,000 and 10,000, H 15, both sizes and dtypes; CEM
decisions for 1 and 16 beliefs), ``tune`` (every launch variant against the default; without the split variants when
``split`` failed), ``compiled`` (imagine at N 10,000 with torch.compile's default mode beside eager, graphed and
fastwm), ``steps`` (img_step and obs_step).

What comes back (a device call returns at most 8 files, at most two folders down): ``OUT/session.json`` (every step's
status, seconds and command; device, versions, commit), ``OUT/session.log`` (this program's output), ``OUT/tests.log``,
``OUT/rssm/bench_rssm.json``, ``OUT/rollout/bench_rollout.json`` and ``rollout_throughput.png``,
``OUT/tune/tune.json`` (``*.partial.json`` instead, for a step stopped at its limit) and ``OUT/extra.tar.gz`` (every
log, the compiled and steps rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["Step", "build_plan", "check_plan", "main", "out_files"]

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MAX_OUT_FILES = 8  # what one device call brings back
MAX_OUT_DEPTH = 2  # OUT/a/b/file comes back, OUT/a/b/c/file does not
PACK_RESERVE_S = 20.0  # kept back from the deadline for writing session.json and extra.tar.gz

# The kernel tests: those of the open issues' kernels (observe, rollout, the step, planning) on workers of their own,
# the rest beside them (xdist hands tests out in file order, so a step stopped at its limit has run the first ones).
TEST_FILES = ("test_observe", "test_rollout", "test_step", "test_planning")
MORE_TEST_FILES = ("test_rssm", "test_gaussian", "test_kl_loss", "test_elbo", "test_compile", "test_backend",
                   "test_validation")

# What phase 2 times. Each list is the `python -m fastwm bench` arguments after "bench", without --out / --device.
OBSERVE = ["--suite", "rssm", "--ops", "observe", "--providers", "eager,graphed,fused-steps,fastwm,recompute"]
ROLLOUT = ["--suite", "rollout", "--N", "1000,10000", "--H", "15", "--providers", "eager,graphed,fastwm"]
COMPILED = ["--suite", "rollout", "--ops", "imagine", "--N", "10000", "--H", "15",
            "--providers", "eager,compiled,graphed,fastwm", "--compile-mode", "default"]
STEPS = ["--suite", "rssm", "--ops", "img_step,obs_step", "--providers", "eager,graphed,fastwm"]

# The CPU smoke plan (--smoke): the same machinery on tiny cases that take seconds.
SMOKE_TESTS = ("test_backend",)
SMOKE_BENCH = ["--suite", "rssm", "--ops", "img_step", "--modes", "fwd", "--providers", "eager,fastwm",
               "--rssm-sizes", "planet", "--quick"]


@dataclass
class Step:
    """One part of the session: ``commands`` run one after another into ``log`` (or, when it is a callable, the
    commands made from the results so far when the step starts), within ``timeout_s`` and the deadline. Phase 1 steps
    run side by side (``after``: not before that step ended with status 0; skipped if it did not); phase 2 steps one
    at a time, in order, each skipped when less than ``min_s`` is left."""

    name: str
    phase: int
    commands: list[list[str]] | Callable[[dict[str, dict[str, Any]]], list[list[str]]]
    timeout_s: float
    log: Path
    after: str | None = None
    min_s: float = 20.0
    env: dict[str, str] = field(default_factory=dict)

    def resolve(self, results: dict[str, dict[str, Any]]) -> list[list[str]]:
        return self.commands(results) if callable(self.commands) else self.commands


def _bench(args: Sequence[str], out: Path | None, device: str, warm: tuple[int, int] | None = None) -> list[str]:
    cmd = [PY, "-m", "fastwm", "bench", *args, "--device", device]
    if warm is not None:
        cmd += ["--warm-only", "--shard", f"{warm[0]}/{warm[1]}", "--out", os.devnull]
    else:
        assert out is not None
        cmd += ["--out", str(out)]
    return cmd


def _tune(args: Sequence[str], out: Path | None, device: str, warm: tuple[int, int] | None = None) -> list[str]:
    cmd = [PY, "-m", "fastwm.benchmarks.tune", *args, "--device", device]
    if warm is not None:
        cmd += ["--warm-only", "--shard", f"{warm[0]}/{warm[1]}"]
    else:
        assert out is not None
        cmd += ["--out", str(out)]
    return cmd


def _pytest(files: Sequence[str], device: str, workers: int, extra: Sequence[str] = ()) -> list[str]:
    """pytest over ``files``, one line per test (a run stopped at its limit still says which tests passed)."""
    cmd = [PY, "-m", "pytest", *(f"tests/{f}.py" for f in files), "--device", device, "-v", "-rfE",
           "-p", "no:cacheprovider", "--durations=10", *extra]
    if workers > 1:
        cmd += ["-n", str(workers)]
    return cmd


def build_plan(out: Path, work: Path, *, device: str = "cuda", workers: int = 8, test_workers: int = 7,
               smoke: bool = False) -> list[Step]:
    """The session's steps. ``out``: what comes back; ``work``: logs and caches that stay on the machine (packed into
    ``out/extra.tar.gz`` at the end)."""
    logs = work / "logs"
    extra = work / "extra"
    if smoke:  # tiny, on the CPU: the orchestration, not the numbers
        return [
            Step("tests", 1, [_pytest(SMOKE_TESTS, device, 1)], 120, out / "tests.log"),
            *(Step(f"warm-{i}", 1, [_bench(SMOKE_BENCH, None, device, (i, 2))], 120, logs / f"warm-{i}.log")
              for i in range(2)),
            Step("rssm", 2, [_bench(SMOKE_BENCH, out / "rssm", device)], 120, logs / "rssm.log"),
        ]
    steps = [
        Step("tests", 1, [_pytest(TEST_FILES, device, max(1, test_workers - test_workers // 3),
                                  ["-k", "not feature_split"])], 300, out / "tests.log"),
        Step("tests-more", 1, [_pytest(MORE_TEST_FILES, device, max(1, test_workers // 3))], 300,
             logs / "tests-more.log"),
        Step("split", 1, [_pytest(("test_observe",), device, 1, ["-k", "feature_split"])], 150,
             logs / "split.log"),
    ]
    split_shards = 3
    steps += [Step(f"split-warm-{j}", 1, [_tune(["--kinds", "observe", "--variants", "split"], None, device,
                                                (j, split_shards))], 300, logs / f"split-warm-{j}.log", after="split")
              for j in range(split_shards)]
    for i in range(workers):
        shard = (i, workers)
        steps.append(Step(f"warm-{i}", 1, [
            _bench(OBSERVE, None, device, shard),
            _bench(ROLLOUT, None, device, shard),
            _tune(["--no-split"], None, device, shard),
            _bench(COMPILED, None, device, shard),
            _bench(STEPS, None, device, shard),
        ], 300, logs / f"warm-{i}.log", env={"TORCHINDUCTOR_COMPILE_THREADS": "1"}))  # 8 of them share the cores

    def tune_commands(results: dict[str, dict[str, Any]]) -> list[list[str]]:
        split_ok = results.get("split", {}).get("rc") == 0
        return [_tune([] if split_ok else ["--no-split"], out / "tune", device)]

    steps += [
        Step("observe", 2, [_bench(OBSERVE, out / "rssm", device)], 160, logs / "observe.log", min_s=40),
        Step("rollout", 2, [_bench(ROLLOUT, out / "rollout", device)], 130, logs / "rollout.log", min_s=40),
        Step("tune", 2, tune_commands, 150, logs / "tune.log", min_s=30),
        Step("compiled", 2, [_bench(COMPILED, extra / "rollout-compiled", device)], 90, logs / "compiled.log"),
        Step("steps", 2, [_bench(STEPS, extra / "steps", device)], 60, logs / "steps.log"),
    ]
    return steps


def check_plan(steps: Sequence[Step]) -> list[str]:
    """Each command's arguments parsed by the program it runs (the benchmark harness's plan built, tune's options
    checked; pytest commands must name existing files): the problems found, empty when none. Costs no device time,
    so a session can run it before anything else."""
    import torch

    from fastwm.__main__ import build_parser as fastwm_parser

    from . import tune
    from .harness import _plans, parse_shard

    problems = []
    for step in steps:
        commands = step.resolve({}) + (step.resolve({"split": {"rc": 0}}) if callable(step.commands) else [])
        for cmd in commands:
            where = f"{step.name}: {shlex.join(cmd[1:])}"
            try:
                if cmd[1:3] == ["-m", "fastwm"]:
                    args = fastwm_parser().parse_args(cmd[3:])
                    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
                    _plans(args, device, bool(args.quick) or device.type == "cpu")
                    if args.shard is not None:
                        parse_shard(args.shard)
                elif cmd[1:3] == ["-m", "fastwm.benchmarks.tune"]:
                    tune.check_args(tune.build_parser().parse_args(cmd[3:]))
                elif cmd[1:3] == ["-m", "pytest"]:
                    missing = [a for a in cmd[3:] if a.startswith("tests/") and not (ROOT / a).exists()]
                    if missing:
                        raise ValueError(f"no such test file: {', '.join(missing)}")
                else:
                    raise ValueError("not a command this session knows")
            except (SystemExit, ValueError, RuntimeError) as exc:
                problems.append(f"{where}: {type(exc).__name__}: {exc}")
    return problems


def out_files(out: Path) -> tuple[list[Path], list[str]]:
    """The files under ``out`` and the reasons a device call would not bring some back (more than
    :data:`MAX_OUT_FILES`, or deeper than :data:`MAX_OUT_DEPTH` folders)."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    problems = [f"{p.relative_to(out)}: more than {MAX_OUT_DEPTH} folders down"
                for p in files if len(p.relative_to(out).parts) > MAX_OUT_DEPTH + 1]
    if len(files) > MAX_OUT_FILES:
        problems.append(f"{len(files)} files under {out}: a device call brings back {MAX_OUT_FILES}")
    return files, problems


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------


class _Log:
    """This program's output, on stdout and in ``path``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {message}"
        print(line, flush=True)
        self._file.write(line + "\n")
        self._file.flush()


@dataclass
class _Running:
    step: Step
    commands: list[list[str]]
    env: dict[str, str]
    started: float
    index: int = -1
    proc: subprocess.Popen | None = None
    rc: int | None = None  # the first non-zero status of its commands, or 0
    file: Any = None

    def start_next(self) -> bool:
        """Start the next command; False when none is left."""
        self.index += 1
        if self.index >= len(self.commands):
            return False
        if self.file is None:
            self.step.log.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.step.log.open("w")
        self.file.write(f"$ {shlex.join(self.commands[self.index])}\n")
        self.file.flush()
        self.proc = subprocess.Popen(self.commands[self.index], cwd=ROOT, env=self.env, stdout=self.file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return True

    def poll(self) -> bool:
        """Advance; True once every command has ended (a failing one does not stop the others of a warm step, but
        its status is kept)."""
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is None:
            return False
        if rc != 0 and not self.rc:
            self.rc = rc
        self.file.write(f"# exit {rc}\n")
        self.file.flush()
        if self.start_next():
            return False
        self.rc = self.rc or 0
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the command and its children (pytest's workers)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self.file is not None:
            self.file.write("# killed at its time limit\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _run_steps(steps: Sequence[Step], results: dict[str, dict[str, Any]], env: dict[str, str], deadline: float,
               parallel: bool, log: _Log) -> None:
    """Run ``steps`` (side by side, or one at a time in order) until each ends, reaches its limit or the deadline;
    record each in ``results``."""
    waiting = list(steps)
    running: list[_Running] = []

    def finish(r: _Running, timed_out: bool) -> None:
        if timed_out:
            r.kill()
        r.close()
        seconds = time.monotonic() - r.started
        results[r.step.name] = {"phase": r.step.phase, "rc": None if timed_out else r.rc, "timed_out": timed_out,
                                "seconds": round(seconds, 1), "log": str(r.step.log),
                                "commands": [shlex.join(c) for c in r.commands]}
        log(f"{r.step.name}: {_state(results[r.step.name])} after {seconds:.0f} s")

    def skip(step: Step, why: str) -> None:
        results[step.name] = {"phase": step.phase, "rc": None, "timed_out": False, "seconds": 0.0, "skipped": why}
        log(f"{step.name}: skipped ({why})")

    while waiting or running:
        now = time.monotonic()
        for step in list(waiting):
            if running and not parallel:
                break
            if step.after is not None and step.after not in results:
                continue
            waiting.remove(step)
            if step.after is not None and results[step.after].get("rc") != 0:
                skip(step, f"{step.after} did not pass")
                continue
            left = deadline - now
            if left < step.min_s:
                skip(step, f"{left:.0f} s left, it needs {step.min_s:.0f}")
                continue
            r = _Running(step, step.resolve(results), {**env, **step.env}, now)
            r.start_next()
            running.append(r)
            log(f"{step.name}: started (limit {min(step.timeout_s, left):.0f} s)")
        time.sleep(0.2)
        now = time.monotonic()
        for r in list(running):
            if r.poll():
                running.remove(r)
                finish(r, False)
            elif now - r.started > r.step.timeout_s or now > deadline:
                running.remove(r)
                finish(r, True)


def _versions(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count, memory_gb=round(props.total_memory / 1e9, 1))
        try:  # read-only: what the card reports, nothing is set
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,temperature.gpu",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    else:
        import platform

        info["device"] = platform.processor() or platform.machine()
    return info


def _ensure_installed(log: _Log) -> bool:
    """fastwm importable with its kernels (``fastwm.kernels`` is the kernels/ folder only once installed): else an
    editable install from this tree, with nothing fetched (the GPU machine reaches no registry)."""
    probe = [PY, "-c", "import fastwm.kernels, fastwm.benchmarks"]
    if subprocess.run(probe, cwd=ROOT, capture_output=True).returncode == 0:
        return True
    log("installing fastwm from this tree (pip install -e . --no-deps --no-build-isolation --no-index)")
    done = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                           "-e", str(ROOT)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        log(f"install failed:\n{done.stdout}{done.stderr}")
        return False
    return subprocess.run(probe, cwd=ROOT, capture_output=True).returncode == 0


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _pack(out: Path, work: Path, log: _Log) -> None:
    """Every log and extra row into out/extra.tar.gz (the caches stay behind)."""
    target = out / "extra.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        for sub in ("logs", "extra"):
            if (work / sub).exists():
                tar.add(work / sub, arcname=sub)
    log(f"packed {target} ({target.stat().st_size / 1e6:.2f} MB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.session", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")),
                        help="what comes back (default: $OUT, else gpu_out)")
    parser.add_argument("--work", type=Path, default=None,
                        help="logs and caches, outside --out (default: fastwm-session in the system's temporary "
                        "folder)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="the deadline, in seconds from the start (default 540: a 600 s device command with a "
                        "minute to spare)")
    parser.add_argument("--phase1-s", type=float, default=240.0,
                        help="phase 1's share of the budget (tests, the split, the compilation) (default 240)")
    parser.add_argument("--workers", type=int, default=8, help="compiling processes in phase 1 (default 8)")
    parser.add_argument("--test-workers", type=int, default=7,
                        help="pytest workers in phase 1, two thirds of them for the open issues' kernels (default 7)")
    parser.add_argument("--device", default=None, help="cuda (default) or, with --smoke, cpu")
    parser.add_argument("--dry-run", action="store_true", help="print the plan with its arguments checked; run nothing")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny plan on the CPU (the Triton interpreter): checks the orchestration in seconds")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if args.workers < 1 or args.test_workers < 1:
        parser.error("--workers and --test-workers take positive integers")
    if not 0 < args.phase1_s < args.budget_s:
        parser.error("--phase1-s must be positive and below --budget-s")
    out = args.out.resolve()
    work = (args.work or Path(tempfile.gettempdir()) / "fastwm-session").resolve()
    if work == out or out in work.parents:
        parser.error("--work must lie outside --out (it holds caches that must not come back)")
    steps = build_plan(out, work, device=device, workers=args.workers, test_workers=args.test_workers,
                       smoke=args.smoke)

    if args.dry_run:
        for step in steps:
            cmds = step.resolve({"split": {"rc": 0}})
            dep = f", after {step.after}" if step.after else ""
            print(f"phase {step.phase} {step.name} (limit {step.timeout_s:.0f} s{dep}):")
            for cmd in cmds:
                print(f"    {shlex.join(cmd)}")
        problems = check_plan(steps)
        for p in problems:
            print(f"PROBLEM {p}")
        print("plan checked: " + ("no problems" if not problems else f"{len(problems)} problems"))
        return 1 if problems else 0

    out.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "extra"):  # an earlier run's; its caches are kept
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "session.log")
    start = time.monotonic()
    deadline = start + args.budget_s - PACK_RESERVE_S
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(work / "triton-cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache")}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    summary: dict[str, Any] = {"commit": os.environ.get("FASTWM_COMMIT"), "budget_s": args.budget_s,
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "steps": {}}
    status = 0
    if not _ensure_installed(log):
        status = 2
    else:  # checked in a new interpreter: this one started before the editable install and cannot import it
        check = [PY, "-m", "benchmarks.session", "--dry-run", "--out", str(out), "--work", str(work), "--device",
                 device, "--workers", str(args.workers), "--test-workers", str(args.test_workers)]
        done = subprocess.run(check + (["--smoke"] if args.smoke else []), cwd=ROOT, capture_output=True, text=True,
                              env=env)
        log(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "plan check printed nothing")
        if done.returncode != 0:
            log(f"the plan does not parse:\n{done.stdout}{done.stderr}")
            status = 2
    if status == 0:
        summary.update(_versions(device))
        log(f"device {summary.get('device')}, torch {summary['torch']}, triton {summary['triton']}, "
            f"commit {summary['commit']}")
        results: dict[str, dict[str, Any]] = summary["steps"]
        phase1_deadline = min(deadline, start + args.phase1_s)
        _run_steps([s for s in steps if s.phase == 1], results, env, phase1_deadline, True, log)
        (out / "session.json").write_text(json.dumps(summary, indent=1) + "\n")  # in case the rest is cut off
        for name in ("tests", "tests-more"):
            if "log" in results.get(name, {}):
                log(f"--- {name} (the end of its log)\n" + _tail(Path(results[name]["log"]), 8))
        _run_steps([s for s in steps if s.phase == 2], results, env, deadline, False, log)
        for name, r in results.items():
            if r["phase"] == 2 and "log" in r:
                log(f"--- {name} (the end of its log)\n" + _tail(Path(r["log"]), 14))
        bad = [n for n, r in results.items() if r.get("rc") not in (0, None) or r.get("timed_out")]
        status = 1 if bad else 0
        summary["elapsed_s"] = round(time.monotonic() - start, 1)
        _pack(out, work, log)
    files, problems = out_files(out)
    summary["out_problems"] = problems
    (out / "session.json").write_text(json.dumps(summary, indent=1) + "\n")
    for p in problems:
        log(f"WARNING {p}")
    log("steps: " + ", ".join(f"{n} {_state(r)}" for n, r in summary["steps"].items()))
    return status


def _state(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return "skipped"
    if result.get("timed_out"):
        return "TIMED OUT"
    return "ok" if result.get("rc") == 0 else f"FAILED (exit {result.get('rc')})"


if __name__ == "__main__":
    sys.exit(main())
