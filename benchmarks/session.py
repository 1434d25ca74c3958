"""The whole GPU session in one command that fits a lent machine's budget: correctness on cuda first, then the
headline timings, each part under its own time limit and all of them under one deadline.

A task that draws a GPU gets 15 minutes of device time in all, the machine's start (a minute or more) included, and
one command may run 10 minutes: a single call of this, with a deadline well inside the command's limit, is the session.

    FASTWM_COMMIT=<sha> python3 -m benchmarks.session --out "$OUT"   # on the GPU machine, from a checkout (540 s)
    python -m benchmarks.session --dry-run                             # the plan, its arguments checked
    python -m benchmarks.session --smoke --out DIR                     # the same machinery on the CPU, tiny

Phase 1 runs in parallel, because its cost is compilation, on the CPU cores:

* ``tests``: pytest ``--device cuda`` over the kernel tests of observe, rollout, the step and planning, and beside
  it ``tests-more`` over rssm, gaussian, kl, elbo, compile, backend, validation and amp (``--test-workers`` processes
  between them);
* ``split``: observe's feature-split test alone (its programs meet at grid barriers that have never run on a GPU;
  a hang is ended by pytest-timeout after 90 s, or killed at the step's limit), then, if it passed, the split's tune
  variants compiled (``split-warm-*``);
* ``warm-*``: ``--warm-only --shard I/W`` of the cases of observe, rollout and tune (``fastwm bench``,
  ``benchmarks.tune``): each kernel variant compiled once into Triton's on-disk cache, so that the timing processes
  find it there instead of compiling one after another. Warm steps still running at phase 1's end are stopped
  (expected, not a failure).

Phase 2 runs one step at a time (timings must not share the GPU), in this order, each skipped once too little time is
left: ``observe`` (bench rssm observe: both sizes, fp32 and bf16, fwd and fwd_bwd; eager, graphed, fused-steps,
fastwm, recompute), ``rollout`` (imagine and imagine_return at N 1,000 and 10,000, H 15, both sizes and dtypes; CEM
decisions for 1 and 16 beliefs, also with the planner's CUDA graph), ``tune`` (every launch variant against the
default; without the split variants when ``split`` or one of its warm-ups failed; the split variants are timed after
all the others), ``compiled`` (imagine at N 10,000 with torch.compile's reduce-overhead mode beside eager, graphed
and fastwm; warmed in phase 1 when the warm shards get that far), ``steps`` (img_step and obs_step): the last two only
if time is left, compiling in their own step. bf16 runs before fp32 in every suite (performance.md's floor is bf16's).

pytest's plugins are probed first: without xdist the test steps run in one process, without pytest-timeout the split
is ended by its step's limit (their flags would make pytest exit 4 and lose every test of the step). A suite whose
device is lost (a sticky CUDA error) exits 3 with its rows so far in ``*.partial.json``; the session records it
(``device_lost``) and goes on with its next step, in a new process. The commands that end together are SIGKILLed
together and waited for together (10 s at most); one still there after that is recorded (``not_gone``), and so is
every step started while it was (``contaminated_by``; ``timings_contaminated_by`` in session.json).

The checkout runs as it is, from the repository root, with nothing installed (``fastwm/__init__.py`` finds kernels/
and benchmarks/ there); an install is tried only if that import fails. Every command's process group is killed when
its step ends, at its limit, at the deadline, or when the session stops (SIGTERM included). session.json is rewritten
after every step; on SIGTERM (or SIGINT) the running steps are killed, and the throughput plot (drawn from the partial
rows when the rollout step was cut), extra.tar.gz and session.json (``stopped``) are still written.

What comes back (a device call returns at most 8 files, at most two folders down): ``OUT/session.json`` (every step's
status, seconds and command; device, versions, commit), ``OUT/tests.log``, ``OUT/rssm/bench_rssm.json``,
``OUT/rollout/bench_rollout.json`` and ``rollout_throughput.png``, ``OUT/tune/tune.json`` (``*.partial.json``
instead, for a step stopped at its limit) and ``OUT/extra.tar.gz`` (every log, this program's own ``session.log``
among them, the compiled and steps rows, and anything else that was left under OUT): 7 files at most. This program's
output also goes to stdout, whose end the device call returns.
"""

from __future__ import annotations

import argparse
import importlib.util
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
PACK_RESERVE_S = 35.0  # kept back for the kill, the plot from partial rows, session.json and extra.tar.gz
KILL_WAIT_S = 10.0  # how long the processes killed together are waited for (all of them at once, not each)
PLOT_TIMEOUT_S = 20.0  # drawing rollout_throughput.png from a cut rollout step's partial rows, when packing
COMMAND_LIMIT_S = 600.0  # the device call's limit on the one command the session is
DEVICE_LOST_RC = 3  # harness.DEVICE_LOST_RC: a suite stopped because the CUDA context was poisoned
# What stays under OUT (at most 7 at once, with extra.tar.gz 8): anything else is moved into extra.tar.gz.
KEEP = ("session.json", "tests.log", "rssm/bench_rssm.json", "rssm/bench_rssm.partial.json",
        "rollout/bench_rollout.json", "rollout/bench_rollout.partial.json", "rollout/rollout_throughput.png",
        "tune/tune.json", "tune/tune.partial.json")

# The kernel tests: those of the open issues' kernels (observe, rollout, the step, planning) on workers of their own,
# the rest beside them (xdist hands tests out in file order, so a step stopped at its limit has run the first ones).
TEST_FILES = ("test_observe", "test_rollout", "test_step", "test_planning")
MORE_TEST_FILES = ("test_rssm", "test_gaussian", "test_kl_loss", "test_elbo", "test_compile", "test_backend",
                   "test_validation", "test_amp")

# What phase 2 times. Each list is the `python -m fastwm bench` arguments after "bench", without --out / --device.
OBSERVE = ["--suite", "rssm", "--ops", "observe", "--providers", "eager,graphed,fused-steps,fastwm,recompute"]
ROLLOUT = ["--suite", "rollout", "--N", "1000,10000", "--H", "15", "--providers", "eager,graphed,fastwm,fastwm-graphed"]
# performance.md's compiled baseline: reduce-overhead (torch.compile with CUDA graphs), the strongest one for these
# launch-bound loops (max-autotune-no-cudagraphs autotunes for minutes: no time for it in this session)
COMPILED = ["--suite", "rollout", "--ops", "imagine", "--N", "10000", "--H", "15",
            "--providers", "eager,compiled,graphed,fastwm", "--compile-mode", "reduce-overhead"]
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
    cut_ok: bool = False  # a warm step: stopped at the phase's deadline is expected, not a failure

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


def have_module(name: str) -> bool:
    """Whether ``name`` imports in this interpreter (the one the steps run): pytest's plugins are probed so that a flag
    of a missing one (pytest exits 4 on it, and every test of the step is lost) is left out."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def pytest_plugins() -> dict[str, bool]:
    """The pytest plugins the plan uses: xdist (-n) and pytest-timeout (--timeout), found or not."""
    return {"xdist": have_module("xdist"), "pytest_timeout": have_module("pytest_timeout")}


def _pytest(files: Sequence[str], device: str, workers: int, extra: Sequence[str] = (),
            timeout: tuple[int, str] | None = None) -> list[str]:
    """pytest over ``files``, one line per test (a run stopped at its limit still says which tests passed); on
    ``workers`` xdist processes when xdist is there, with pytest-timeout's ``timeout`` (seconds, method) when it is."""
    cmd = [PY, "-m", "pytest", *(f"tests/{f}.py" for f in files), "--device", device, "-v", "-rfE",
           "-p", "no:cacheprovider", "--durations=10", *extra]
    plugins = pytest_plugins()
    if workers > 1 and plugins["xdist"]:
        cmd += ["-n", str(workers)]
    if timeout is not None and plugins["pytest_timeout"]:
        cmd += ["--timeout", str(timeout[0]), "--timeout-method", timeout[1]]
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
        # pytest-timeout (where it is installed) ends a hung test in 90 s with the threads' stacks in the log; else
        # the step's limit kills it
        Step("split", 1, [_pytest(("test_observe",), device, 1, ["-k", "feature_split"], timeout=(90, "thread"))],
             150, logs / "split.log"),
    ]
    split_shards = 3
    steps += [Step(f"split-warm-{j}", 1, [_tune(["--kinds", "observe", "--variants", "split"], None, device,
                                                (j, split_shards))], 300, logs / f"split-warm-{j}.log", after="split",
                   cut_ok=True)
              for j in range(split_shards)]
    # What phase 2 is sure to reach is warmed: observe, the rollout and tune, then, if the phase has time left, the
    # compiled step's cases (Inductor's cache; steps, last, compiles in its own step if time is left). Command j of
    # shard i deals from (i + j) mod W, so that the shards that get a command's leftover cases differ from command to
    # command.
    warmed = [(_bench, OBSERVE), (_bench, ROLLOUT), (_tune, ["--no-split"]), (_bench, COMPILED)]
    for i in range(workers):
        steps.append(Step(f"warm-{i}", 1, [make(args, None, device, ((i + j) % workers, workers))
                                           for j, (make, args) in enumerate(warmed)],
                          300, logs / f"warm-{i}.log", cut_ok=True))

    def tune_commands(results: dict[str, dict[str, Any]]) -> list[list[str]]:
        # the split's variants are timed only if its test passed and none of its warm-ups hung
        split_ok = results.get("split", {}).get("rc") == 0 and not any(
            r.get("timed_out") for n, r in results.items() if n.startswith("split-warm"))
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
    names = [s.name for s in steps]
    for step in steps:
        if step.after is not None and (step.after not in names or step.phase != steps[names.index(step.after)].phase):
            problems.append(f"{step.name}: after {step.after!r}, which is no step of phase {step.phase}")
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
    device_lost: bool = False  # a command exited DEVICE_LOST_RC
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
        self.device_lost = self.device_lost or rc == DEVICE_LOST_RC
        self.file.write(f"# exit {rc}\n")
        self.file.flush()
        if self.start_next():
            return False
        self.rc = self.rc or 0
        return True

    def send_kill(self) -> None:
        """SIGKILL the command's whole process group (its children too: pytest's workers, background jobs), also
        when the command itself has ended."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def gone(self) -> bool:
        """Whether the command and every process of its group have ended (the command reaped)."""
        if self.proc is None:
            return True
        if self.proc.poll() is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _kill_together(runs: Sequence[_Running]) -> dict[int, bool]:
    """SIGKILL every process group of ``runs`` first, then wait for all of them together, :data:`KILL_WAIT_S` at
    most in all: id(run) -> whether it went (False: a process stuck in the driver, say)."""
    for r in runs:
        r.send_kill()
    until = time.monotonic() + KILL_WAIT_S
    left = list(runs)
    while True:
        left = [r for r in left if not r.gone()]
        if not left or time.monotonic() >= until:
            break
        time.sleep(0.05)
    return {id(r): r not in left for r in runs}


def _run_steps(steps: Sequence[Step], results: dict[str, dict[str, Any]], env: dict[str, str], deadline: float,
               parallel: bool, log: _Log, on_change: Callable[[], None] | None = None,
               survivors: list[tuple[str, _Running]] | None = None) -> None:
    """Run ``steps`` (side by side, or one at a time in order) until each ends, reaches its limit or the deadline;
    record each in ``results`` (and call ``on_change`` after each step is recorded: session.json is rewritten).
    The steps that end together are killed together. ``survivors``: the (name, run) of commands that outlived their
    kill, shared between calls: a step started while one of them is still there is marked ``contaminated_by`` it
    (its timings shared the device with it)."""
    waiting = list(steps)
    running: list[_Running] = []
    known = {s.name for s in steps}
    survivors = [] if survivors is None else survivors

    def finish(ended: Sequence[tuple[_Running, bool, str]]) -> None:
        """Record the (run, timed_out, why) that end now, after killing what each left behind, all at once."""
        went = _kill_together([r for r, _, _ in ended])
        for r, timed_out, why in ended:
            gone = went[id(r)]
            if r.file is not None and (timed_out or not gone):
                r.file.write(f"# killed: {why or 'what it left behind'}"
                             f"{'' if gone else f' (and still not gone after {KILL_WAIT_S:.0f} s)'}\n")
            r.close()
            seconds = time.monotonic() - r.started
            result = {"phase": r.step.phase, "rc": None if timed_out else r.rc, "timed_out": timed_out,
                      "killed": why if timed_out else None, "cut_ok": r.step.cut_ok, "seconds": round(seconds, 1),
                      "log": str(r.step.log), "commands": [shlex.join(c) for c in r.commands]}
            if r.device_lost:
                result["device_lost"] = True
            if not gone:
                result["not_gone"] = True
                result["pgid"] = r.proc.pid if r.proc is not None else None
                survivors.append((r.step.name, r))
            if r.step.name in contaminated:
                result["contaminated_by"] = contaminated[r.step.name]
            results[r.step.name] = result
            log(f"{r.step.name}: {_state(result)} after {seconds:.0f} s"
                + ("" if gone else f"; WARNING: still not gone {KILL_WAIT_S:.0f} s after SIGKILL"))
        if ended and on_change is not None:
            on_change()

    def skip(step: Step, why: str) -> None:
        results[step.name] = {"phase": step.phase, "rc": None, "timed_out": False, "seconds": 0.0, "skipped": why}
        log(f"{step.name}: skipped ({why})")
        if on_change is not None:
            on_change()

    contaminated: dict[str, list[str]] = {}

    def started(r: _Running) -> None:
        alive = [name for name, s in survivors if not s.gone()]
        if alive:
            contaminated[r.step.name] = alive
            log(f"{r.step.name}: WARNING: started while {', '.join(alive)} (killed) is still there: its timings "
                "are contaminated")

    try:
        _schedule(waiting, running, known, results, env, deadline, parallel, finish, skip, started, log)
    finally:  # an exception or a SIGTERM in here: leave nothing running
        stopping, running[:] = list(running), []
        finish([(r, True, "the session stopped") for r in stopping])


def _schedule(waiting: list[Step], running: list[_Running], known: set[str], results: dict[str, dict[str, Any]],
              env: dict[str, str], deadline: float, parallel: bool, finish: Callable[..., None],
              skip: Callable[[Step, str], None], started: Callable[[_Running], None], log: _Log) -> None:
    while waiting or running:
        now = time.monotonic()
        for step in list(waiting):
            if running and not parallel:
                break
            if step.after is not None and step.after not in results:
                if step.after in known:
                    continue
                waiting.remove(step)
                skip(step, f"{step.after} is not in this phase")
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
            started(r)
            r.start_next()
            running.append(r)
            log(f"{step.name}: started (limit {min(step.timeout_s, left):.0f} s)")
        time.sleep(0.2)
        now = time.monotonic()
        ended: list[tuple[_Running, bool, str]] = []
        for r in list(running):
            if r.poll():
                ended.append((r, False, ""))
            elif now - r.started > r.step.timeout_s or now > deadline:
                why = "at its time limit" if now - r.started > r.step.timeout_s else "at the deadline"
                ended.append((r, True, why))
        if ended:  # recorded before they leave ``running``: a SIGTERM in between still has them killed
            finish(ended)
        for r, _, _ in ended:
            running.remove(r)


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

    def importable() -> bool:
        try:
            done = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            log("importing fastwm took over 120 s")
            return False
        if done.returncode != 0:
            log(f"fastwm does not import from {ROOT}:\n{done.stderr.strip()[-2000:]}")
        return done.returncode == 0

    # From the repository root a checkout imports as it is (fastwm/__init__.py finds kernels/ and benchmarks/):
    # no install needed, and none can break.
    if importable():
        return True
    log("installing fastwm from this tree (pip install -e . --no-deps --no-build-isolation --no-index)")
    try:
        done = subprocess.run([PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                               "--no-build-isolation", "--no-index", "-e", str(ROOT)], cwd=ROOT, capture_output=True,
                              text=True, timeout=180)
    except subprocess.TimeoutExpired:
        log("pip install took over 180 s")
        return False
    if done.returncode != 0:
        log(f"install failed:\n{done.stdout}{done.stderr}")
        return False
    return importable()


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _pack(out: Path, work: Path, log: _Log) -> None:
    """Every log and extra row into out/extra.tar.gz (the caches stay behind), and with them whatever else lies
    under ``out`` beside :data:`KEEP` (a suite's partial rows beside its final ones, say), so that everything comes
    back within a device call's 8 files."""
    target = out / "extra.tar.gz"
    strays = [p for p in sorted(out.rglob("*")) if p.is_file() and p != target
              and str(p.relative_to(out)) not in KEEP]
    for p in (out / k for k in KEEP if k.endswith(".partial.json")):
        if p.exists() and p.with_name(p.name.replace(".partial", "")).exists():
            strays.append(p)  # the final rows are there: the partial ones go in the archive
    with tarfile.open(target, "w:gz") as tar:
        for sub in ("logs", "extra"):
            if (work / sub).exists():
                tar.add(work / sub, arcname=sub)
        for p in strays:
            tar.add(p, arcname=f"out/{p.relative_to(out)}")
    for p in strays:
        p.unlink()
    log(f"packed {target} ({target.stat().st_size / 1e6:.2f} MB)"
        + (f"; moved into it: {', '.join(str(p.relative_to(out)) for p in strays)}" if strays else ""))


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
        plugins = pytest_plugins()
        print("pytest plugins: " + ", ".join(f"{n} {'found' if f else 'MISSING (its flags left out)'}"
                                             for n, f in plugins.items()))
        problems = check_plan(steps)
        for p in problems:
            print(f"PROBLEM {p}")
        print("plan checked: " + ("no problems" if not problems else f"{len(problems)} problems"))
        return 1 if problems else 0

    out.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "extra"):  # an earlier run's; its caches are kept
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    log = _Log(work / "logs" / "session.log")  # packed into extra.tar.gz; stdout carries it too
    start = time.monotonic()
    summary: dict[str, Any] = {"commit": os.environ.get("FASTWM_COMMIT"), "budget_s": args.budget_s,
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "pytest_plugins": pytest_plugins(), "steps": {}}

    def save() -> None:  # after each step, so that a session cut off still says what it did
        summary["elapsed_s"] = round(time.monotonic() - start, 1)
        (out / "session.json").write_text(json.dumps(summary, indent=1) + "\n")

    def stop(signum: int, frame: object) -> None:
        for sig in handled:  # one stop is enough: what follows (the kill, the packing) must not be cut
            signal.signal(sig, signal.SIG_IGN)
        summary["stopped"] = f"signal {signal.Signals(signum).name} after {time.monotonic() - start:.0f} s"
        raise SystemExit(128 + signum)  # _run_steps' finally kills what runs, main's packs and writes

    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, stop) for sig in handled}
    status = 2
    try:
        deadline = start + args.budget_s - PACK_RESERVE_S
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(work / "triton-cache"),
               "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache")}
        if device == "cpu":
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        missing = [name for name, found in summary["pytest_plugins"].items() if not found]
        if missing:
            log(f"pytest plugins not installed: {', '.join(missing)} (their flags are left out of the plan)")
        status = 0
        if not _ensure_installed(log):
            status = 2
        else:  # checked in a new interpreter, which sees an install made after this one started
            check = [PY, "-m", "benchmarks.session", "--dry-run", "--out", str(out), "--work", str(work), "--device",
                     device, "--workers", str(args.workers), "--test-workers", str(args.test_workers)]
            try:
                done = subprocess.run(check + (["--smoke"] if args.smoke else []), cwd=ROOT, capture_output=True,
                                      text=True, env=env, timeout=120)
            except subprocess.TimeoutExpired as exc:
                done = subprocess.CompletedProcess(exc.cmd, 1, "", "the plan check took over 120 s")
            log(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "plan check printed nothing")
            if done.returncode != 0:
                log(f"the plan does not parse:\n{done.stdout}{done.stderr}")
                status = 2
        if status == 0:
            summary.update(_versions(device))
            log(f"device {summary.get('device')}, torch {summary['torch']}, triton {summary['triton']}, "
                f"commit {summary['commit']}")
            results: dict[str, dict[str, Any]] = summary["steps"]
            survivors: list[tuple[str, _Running]] = []
            phase1_deadline = min(deadline, start + args.phase1_s)
            _run_steps([s for s in steps if s.phase == 1], results, env, phase1_deadline, True, log, save,
                       survivors)
            save()
            for name in ("tests", "tests-more"):
                if "log" in results.get(name, {}):
                    log(f"--- {name} (the end of its log)\n" + _tail(Path(results[name]["log"]), 8))
            _run_steps([s for s in steps if s.phase == 2], results, env, deadline, False, log, save, survivors)
            for name, r in results.items():
                if r["phase"] == 2 and "log" in r:
                    log(f"--- {name} (the end of its log)\n" + _tail(Path(r["log"]), 14))
            bad = [n for n, r in results.items()
                   if r.get("rc") not in (0, None) or (r.get("timed_out") and not r.get("cut_ok"))]
            status = 1 if bad else 0
    except SystemExit as exc:  # SIGTERM / SIGINT: what ran is recorded, packed and written below
        status = exc.code if isinstance(exc.code, int) else 1
        log(f"stopped ({summary.get('stopped', 'exit')}): packing what there is")
    finally:
        def late(signum: int, frame: object) -> None:  # while packing: noted, not obeyed
            summary.setdefault("stopped", f"signal {signal.Signals(signum).name} while packing")

        for sig in handled:
            signal.signal(sig, late)
        try:
            _finish_session(out, work, summary, log, save)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return status


def _finish_session(out: Path, work: Path, summary: dict[str, Any], log: _Log, save: Callable[[], None]) -> None:
    """The end of every session, a stopped one included: the contaminated timings named, the throughput plot drawn
    from a cut rollout step's partial rows, everything packed, session.json written last."""
    steps = summary["steps"]
    contaminated = sorted({n for r in steps.values() for n in r.get("contaminated_by", ())})
    if contaminated:
        summary["timings_contaminated_by"] = contaminated
        log(f"WARNING: timings contaminated: {', '.join(contaminated)} outlived their kill")
    lost = [n for n, r in steps.items() if r.get("device_lost")]
    if lost:
        log(f"WARNING: the device was lost (a sticky CUDA error) in: {', '.join(lost)}")
    try:
        note = _plot_partial(out, log)
        if note:
            summary["plot"] = note
        _pack(out, work, log)
    except Exception as exc:  # noqa: BLE001 - session.json must still be written
        summary["pack_error"] = f"{type(exc).__name__}: {exc}"
        log(f"packing failed: {summary['pack_error']}")
    files, problems = out_files(out)
    summary["out_problems"] = problems
    save()
    for p in problems:
        log(f"WARNING {p}")
    log("steps: " + ", ".join(f"{n} {_state(r)}" for n, r in steps.items()))


def _plot_partial(out: Path, log: _Log) -> str | None:
    """rollout_throughput.png from the rollout step's partial rows, when the step was cut before it drew the plot
    (in a new interpreter, at most :data:`PLOT_TIMEOUT_S`): None when there was nothing to do, else what happened."""
    rollout = out / "rollout"
    partial, png = rollout / "bench_rollout.partial.json", rollout / "rollout_throughput.png"
    if not partial.exists() or png.exists() or (rollout / "bench_rollout.json").exists():
        return None
    code = ("import json, sys; from benchmarks.bench_rollout import plot_throughput; "
            "note = plot_throughput(json.loads(open(sys.argv[1]).read()), sys.argv[2]); print(note or 'drawn')")
    try:
        done = subprocess.run([PY, "-c", code, str(partial), str(png)], cwd=ROOT, capture_output=True, text=True,
                              timeout=PLOT_TIMEOUT_S)
        note = (done.stdout.strip() or done.stderr.strip()[-500:] or f"exit {done.returncode}").splitlines()[-1]
    except subprocess.TimeoutExpired:
        note = f"took over {PLOT_TIMEOUT_S:.0f} s"
    note = f"rollout_throughput.png from the partial rows: {note}"
    log(note)
    return note


def _state(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return "skipped"
    if result.get("timed_out"):
        return "stopped at the phase's end" if result.get("cut_ok") else f"TIMED OUT ({result.get('killed')})"
    if result.get("device_lost"):
        return f"FAILED (exit {result.get('rc')}: the device was lost, the rest of its suite not run)"
    return "ok" if result.get("rc") == 0 else f"FAILED (exit {result.get('rc')})"


if __name__ == "__main__":
    sys.exit(main())
