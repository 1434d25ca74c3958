"""benchmarks.session, the one-command GPU session: its plan parses, its scheduler keeps limits and dependencies, what
it leaves under OUT comes back from a device call, and the harness's --warm-only deals the compiling cases out."""

from __future__ import annotations

import json
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from fastwm.benchmarks import harness, session, tune


def test_the_gpu_plan_parses(tmp_path: Path) -> None:
    steps = session.build_plan(tmp_path / "out", tmp_path / "work")
    assert session.check_plan(steps) == []
    names = [s.name for s in steps]
    assert names.index("tests") < names.index("observe")
    assert [s.name for s in steps if s.phase == 2] == ["observe", "rollout", "tune", "compiled", "steps"]
    # observe's and the rollout's timed commands are warmed, with the same arguments, every shard taking its part
    warm = [s for s in steps if s.name.startswith("warm-")]
    assert len(warm) == 8 and all(w.cut_ok for w in warm)
    for step in (s for s in steps if s.name in ("observe", "rollout")):
        (timed,) = step.resolve({})
        args = timed[timed.index("bench") + 1:timed.index("--out")]
        shards = []
        for w in warm:
            mine = [c[c.index("bench") + 1:] for c in w.resolve({}) if "bench" in c and c[-3:] == ["--out", args[-1]]
                    or "bench" in c and c[c.index("bench") + 1:c.index("--warm-only")] == args]
            assert len(mine) == 1, step.name
            shards.append(mine[0][mine[0].index("--shard") + 1])
        assert sorted(shards) == [f"{i}/8" for i in range(8)], step.name
    tune_step = next(s for s in steps if s.name == "tune")
    assert "--no-split" in tune_step.resolve({"split": {"rc": 1}})[0]
    assert "--no-split" not in tune_step.resolve({"split": {"rc": 0}})[0]
    assert "--no-split" in tune_step.resolve({"split": {"rc": 0}, "split-warm-1": {"timed_out": True}})[0]


def test_check_plan_names_a_bad_command(tmp_path: Path) -> None:
    bad = [session.Step("x", 2, [[sys.executable, "-m", "fastwm", "bench", "--providers", "nope"]], 10,
                        tmp_path / "x.log"),
           session.Step("y", 2, [[sys.executable, "-m", "fastwm.benchmarks.tune", "--variants", "zzz"]], 10,
                        tmp_path / "y.log"),
           session.Step("z", 1, [[sys.executable, "-m", "pytest", "tests/test_nothing_here.py"]], 10,
                        tmp_path / "z.log")]
    bad.append(session.Step("w", 1, [[sys.executable, "-m", "pytest", "tests/test_session.py"]], 10,
                            tmp_path / "w.log", after="nobody"))
    problems = session.check_plan(bad)
    assert len(problems) == 4
    assert "providers" in problems[0] and "variants" in problems[1] and "test_nothing_here" in problems[2]
    assert "nobody" in problems[3]


# starts a grandchild in the background that would sleep a minute, writes its pid, and exits at once
_ORPHAN = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
           "open(r'{}', 'w').write(str(p.pid))")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has ended
    except OSError:
        return False


def _sleep(seconds: float, rc: int = 0) -> list[str]:
    return [sys.executable, "-c", f"import time, sys; time.sleep({seconds}); sys.exit({rc})"]


def test_scheduler_limits_dependencies_and_deadline(tmp_path: Path) -> None:
    log = session._Log(tmp_path / "session.log")
    results: dict = {}
    phase1 = [session.Step("slow", 1, [_sleep(60)], 1.0, tmp_path / "slow.log"),
              session.Step("fails", 1, [_sleep(0, 3), _sleep(0)], 30, tmp_path / "fails.log"),
              session.Step("needs-fails", 1, [_sleep(0)], 30, tmp_path / "n.log", after="fails"),
              session.Step("needs-quick", 1, [_sleep(0)], 30, tmp_path / "q.log", after="quick"),
              session.Step("quick", 1, [_sleep(0.2)], 30, tmp_path / "quick.log"),
              session.Step("orphan", 1, [[sys.executable, "-c", _ORPHAN.format(tmp_path / "orphan.pid")]], 30,
                           tmp_path / "orphan.log"),
              session.Step("needs-nobody", 1, [_sleep(0)], 30, tmp_path / "nb.log", after="nobody")]
    start = time.monotonic()
    session._run_steps(phase1, results, dict(session.os.environ), start + 30, True, log)
    assert time.monotonic() - start < 20  # the sleeper was killed at its 1 s limit
    assert results["slow"]["timed_out"] and results["slow"]["rc"] is None
    assert results["fails"]["rc"] == 3  # the first failing command's status, and the second still ran
    assert (tmp_path / "fails.log").read_text().count("# exit") == 2
    assert "skipped" in results["needs-fails"]
    assert results["needs-quick"]["rc"] == 0 and results["quick"]["rc"] == 0
    assert "skipped" in results["needs-nobody"]
    # a background child of a command that ended normally goes with its process group
    pid = int((tmp_path / "orphan.pid").read_text())
    time.sleep(0.2)
    assert not _alive(pid)
    # phase 2: one at a time; a step that needs more than is left is skipped, the deadline stops the one running
    phase2 = [session.Step("a", 2, [_sleep(60)], 100, tmp_path / "a.log", min_s=0.5),
              session.Step("b", 2, [_sleep(0)], 100, tmp_path / "b.log", min_s=5.0)]
    start = time.monotonic()
    session._run_steps(phase2, results, dict(session.os.environ), start + 1.5, False, log)
    assert results["a"]["timed_out"] and results["a"]["killed"] == "at the deadline"
    assert session._state(results["a"]).startswith("TIMED OUT")
    assert "skipped" in results["b"]


def test_pack_keeps_what_comes_back(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    for name in ("session.json", "tests.log", "rssm/bench_rssm.json", "rssm/bench_rssm.partial.json",
                 "rollout/bench_rollout.partial.json", "stray.txt", "a/b/c/deep.json"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    (work / "logs").mkdir(parents=True)
    (work / "logs" / "x.log").write_text("log")
    session._pack(out, work, session._Log(work / "logs" / "session.log"))
    kept = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert kept == ["extra.tar.gz", "rollout/bench_rollout.partial.json", "rssm/bench_rssm.json", "session.json",
                    "tests.log"]
    with tarfile.open(out / "extra.tar.gz") as tar:
        names = tar.getnames()
    assert {"logs/x.log", "out/stray.txt", "out/a/b/c/deep.json", "out/rssm/bench_rssm.partial.json"} <= set(names)
    assert session.out_files(out)[1] == []


def test_out_files_counts_what_a_device_call_brings_back(tmp_path: Path) -> None:
    for i in range(session.MAX_OUT_FILES):
        (tmp_path / f"f{i}").write_text("x")
    assert session.out_files(tmp_path)[1] == []
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "g").write_text("x")
    problems = session.out_files(tmp_path)[1]
    assert any("folders down" in p for p in problems) and any("brings back" in p for p in problems)


def test_warm_deals_compiling_cases_round_robin(tmp_path: Path) -> None:
    calls: list[tuple[str, bool]] = []

    def run(name: str, warm_only: bool = False) -> dict | None:
        calls.append((name, warm_only))
        return None if warm_only else {"x": 1}

    cases = [(f"c{i}", provider) for i in range(5) for provider in ("eager", "fastwm", "graphed", "recompute")]
    dealt = []
    for index in range(3):
        warm = harness.parse_shard(f"{index}/3")
        calls.clear()
        for name, provider in cases:
            assert not harness._keep_case([], name, str, torch.device("cpu"), [], {}, run, name, warm=warm,
                                          provider=provider)
        assert all(warm_only for _, warm_only in calls)
        dealt.append([name for name, _ in calls])
        assert warm.warmed == len(calls)
    compiling = [name for name, provider in cases if provider not in harness.NOTHING_TO_WARM]
    assert sorted(sum(dealt, [])) == sorted(compiling)  # every compiling case once, no eager or graphed one
    assert [len(d) for d in dealt] == [4, 3, 3]
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            harness.parse_shard(bad)


def test_warm_only_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastwm.__main__ import main

    out = tmp_path / "bench"
    rc = main(["bench", "--suite", "rssm", "--ops", "img_step", "--modes", "fwd", "--providers", "eager,recompute",
               "--rssm-sizes", "planet", "--quick", "--device", "cpu", "--warm-only", "--out", str(out)])
    assert rc == 0 and not out.exists()
    assert "rssm: warmed 0 cases" in capsys.readouterr().out  # recompute is observe's only; eager compiles nothing
    assert main(["bench", "--suite", "rssm", "--shard", "0/2", "--device", "cpu"]) == 2


def test_tune_checks_its_options() -> None:
    parse = tune.build_parser().parse_args
    kinds, prefixes, warm = tune.check_args(parse(["--variants", "split,warps", "--warm-only", "--shard", "1/4"]))
    assert kinds == tune.KINDS and prefixes == ("split", "warps") and (warm.index, warm.count) == (1, 4)
    for argv, what in ((["--kinds", "observe,nope"], "--kinds"), (["--variants", "nope"], "--variants"),
                       (["--shard", "0/2"], "--shard")):
        with pytest.raises(ValueError, match=what):
            tune.check_args(parse(argv))
    split = [v for v in tune.variants_for("observe") if tune._chosen(v, True, ("split",))]
    assert split and all(v.feature_split for v in split)
    assert not any(tune._chosen(v, False, ("split",)) for v in tune.variants_for("observe"))
    same = [v.name for v in tune.variants_for("observe") if tune.same_as_default(v)]
    assert "default" in same and not any(v.startswith("split") or v == "ptxas-regs" for v in same)


def test_tune_times_the_split_last_and_keeps_partial_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastwm.kernels import observe

    seen: list[tuple[str, int]] = []

    def cases(device, quick, dtypes=None):
        for name in ("a", "b"):
            fields = {"B": 4, "deter": 32, "hidden": 32}

            def build(name=name):
                seen.append((name, observe.FEATURE_SPLIT))
                if observe.LOOP_BLOCK_N == 64:
                    raise RuntimeError("this tile fails")
                return lambda: None
            yield "observe", name, fields, build

    monkeypatch.setattr(tune, "_cases", cases)
    partial = tmp_path / "tune.partial.json"
    rows = tune.run(torch.device("cpu"), True, ("observe",), partial=partial, meta={"device": "x"})
    split_at = [i for i, (_, p) in enumerate(seen) if p]
    assert split_at and min(split_at) > max(i for i, (_, p) in enumerate(seen) if not p)  # every split one last
    assert any("error" in r for r in rows)
    on_disk = json.loads(partial.read_text())
    assert len(on_disk) == len(rows) and all(r["device"] == "x" for r in on_disk)
    ratios = [r["speedup_vs_default"] for r in rows if r["variant"] == "default"]
    assert ratios == [1.0, 1.0]
    # warm mode runs each (case, variant) once, but none that launches what the default does; its rows: failures
    seen.clear()
    warm = harness.parse_shard("0/1")
    failures = tune.run(torch.device("cpu"), True, ("observe",), warm=warm)
    n_variants = len(tune.variants_for("observe"))
    n_same = sum(tune.same_as_default(v) for v in tune.variants_for("observe")) - 1  # the default itself is warmed
    assert len(seen) == 2 * (n_variants - n_same) and warm.warmed + len(failures) == len(seen)
    assert failures and all("error" in r for r in failures)


def test_smoke_session_on_the_cpu(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    rc = session.main(["--smoke", "--out", str(out), "--work", str(work), "--budget-s", "300", "--phase1-s", "150"])
    summary = json.loads((out / "session.json").read_text())
    assert rc == 0, summary
    assert {n: r["rc"] for n, r in summary["steps"].items()} == {"tests": 0, "warm-0": 0, "warm-1": 0, "rssm": 0}
    files, problems = session.out_files(out)
    assert problems == [] and summary["out_problems"] == []
    assert sorted(str(p.relative_to(out)) for p in files) == ["extra.tar.gz", "rssm/bench_rssm.json", "session.json",
                                                              "tests.log"]
    rows = json.loads((out / "rssm" / "bench_rssm.json").read_text())
    assert {r["provider"] for r in rows} == {"eager", "fastwm"}
    with tarfile.open(out / "extra.tar.gz") as tar:
        assert {"logs/warm-0.log", "logs/session.log"} <= set(tar.getnames())
    assert "passed" in (out / "tests.log").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# The review's fixes: host time in launch-bound rows, SIGTERM, sticky device errors, plugins, kills, dtype order, the
# compiled baseline, partial rows
# ----------------------------------------------------------------------------------------------------------------------


def test_launch_bound_cases_count_host_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # on "cuda" (faked): the device timer sees 0.01 ms, as do_bench does when the host work overlaps its L2 flush
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(harness, "time_fn", lambda fn, device, quick, min_reps=0: (0.01, 0.009, 0.011))
    cuda = torch.device("cuda")

    def host_bound() -> None:
        time.sleep(0.002)  # 2 ms of Python and launches per call

    wall = harness.measure(host_bound, cuda, True, launch_bound=True)
    assert wall["timing"] == "wall-loop" and wall["median_ms"] >= 1.5 and wall["device_ms"] == 0.01
    assert wall["wall_ms"] == wall["median_ms"]
    dev = harness.measure(host_bound, cuda, True, launch_bound=False)
    assert dev["timing"] in ("do_bench", "cuda-events") and dev["median_ms"] == 0.01 and dev["wall_ms"] >= 1.5


def test_rows_name_their_timing_and_launch_bound_cases_are_wall_timed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fastwm.__main__ import main

    seen: list[tuple[str, bool]] = []
    real = harness.measure

    def spy(fn, device, quick, launch_bound, min_reps=harness.RSSM_MIN_REPS):
        seen.append(launch_bound)
        return real(fn, device, quick, launch_bound, min_reps)

    monkeypatch.setattr(harness, "measure", spy)
    assert main(["bench", "--suite", "rssm", "--ops", "img_step,observe", "--modes", "fwd", "--providers", "eager",
                 "--rssm-sizes", "planet", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert seen == [True, False]  # img_step is launch-bound, observe is not
    rows = json.loads((tmp_path / "bench_rssm.json").read_text())
    assert all(r["timing"] == "perf_counter" and r["wall_ms"] == r["median_ms"] for r in rows)
    seen.clear()
    assert main(["bench", "--suite", "rollout", "--ops", "imagine,cem", "--N", "64,2000", "--H", "3",
                 "--cem-beliefs", "1", "--providers", "eager", "--rssm-sizes", "planet", "--quick", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    assert seen == [True, False, True]  # N 64, N 2000, the CEM decision
    rows = json.loads((tmp_path / "bench_rollout.json").read_text())
    assert all("timing" in r and "device_ms" in r for r in rows)


def test_bf16_runs_first_on_cuda() -> None:
    from fastwm.__main__ import build_parser

    _, rssm, rollout, _ = harness._plans(build_parser().parse_args(["bench"]), torch.device("cuda"), True)
    assert rssm.dtype_names[0] == "bfloat16" and rollout.dtype_names[0] == "bfloat16"
    _, rssm, _, _ = harness._plans(build_parser().parse_args(["bench", "--dtype", "fp32,bf16"]),
                                   torch.device("cuda"), True)
    assert rssm.dtype_names == ["float32", "bfloat16"]  # an explicit order is kept


def test_device_lost_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    assert harness.device_lost(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    assert harness.device_lost(torch.device("cuda")) is None

    def sticky(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", sticky)
    assert "illegal memory access" in harness.device_lost(torch.device("cuda"))


def _fake_rssm_case(calls: list[str], fail_from: int):
    def run(benchmark, mode, provider, size, dtype, device, quick, compile_mode, warm_only=False):
        calls.append(f"{benchmark} {provider}")
        if len(calls) > fail_from:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        median = 2.0 if provider == "eager" else 0.5
        return {k: None for k in harness._RSSM_ROW_KEYS} | {
            "benchmark": f"rssm_{benchmark}", "mode": mode, "provider": provider, "size": size.name, "B": size.B,
            "T": 1, "dtype": "float32", "median_ms": median, "p20_ms": median, "p80_ms": median,
            "us_per_step": median * 1e3}
    return run


def test_a_lost_device_stops_the_suite_with_its_own_exit_status(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from fastwm.__main__ import main

    argv = ["bench", "--suite", "rssm", "--ops", "img_step,obs_step", "--modes", "fwd", "--providers",
            "eager,compiled", "--rssm-sizes", "planet", "--quick", "--device", "cpu", "--out", str(tmp_path)]
    calls: list[str] = []
    monkeypatch.setattr(harness, "_run_rssm_case", _fake_rssm_case(calls, fail_from=2))
    assert main(argv) == 1  # a failure on a device that still works: the rest runs
    assert len(calls) == 4
    calls.clear()
    (tmp_path / "bench_rssm.json").unlink()
    monkeypatch.setattr(harness, "device_lost", lambda device: "CUDA error: an illegal memory access")
    assert main(argv) == harness.DEVICE_LOST_RC == session.DEVICE_LOST_RC
    assert len(calls) == 3  # nothing ran after the case that poisoned the device
    assert not (tmp_path / "bench_rssm.json").exists()
    partial = json.loads((tmp_path / "bench_rssm.partial.json").read_text())
    # the partial rows carry their speedups
    assert [(r["provider"], r["speedup_vs_eager"]) for r in partial] == [("eager", 1.0), ("compiled", 4.0)]


def test_tune_stops_when_the_device_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    def cases(device, quick, dtypes=None):
        for name in ("a", "b"):
            def build(name=name):
                built.append(name)
                raise RuntimeError("illegal memory access")
            yield "observe", name, {"B": 4}, build

    monkeypatch.setattr(tune, "_cases", cases)
    monkeypatch.setattr(harness, "device_lost", lambda device: "sticky")
    rows = tune.run(torch.device("cpu"), True, ("observe",), split=False)
    assert len(built) == 1 and rows[-1]["device_lost"] == "sticky"


def test_session_records_a_lost_device_and_goes_on(tmp_path: Path) -> None:
    log = session._Log(tmp_path / "session.log")
    results: dict = {}
    changes: list[int] = []
    steps = [session.Step("lost", 2, [_sleep(0, session.DEVICE_LOST_RC)], 30, tmp_path / "lost.log", min_s=0),
             session.Step("next", 2, [_sleep(0)], 30, tmp_path / "next.log", min_s=0)]
    session._run_steps(steps, results, dict(session.os.environ), time.monotonic() + 30, False, log,
                       on_change=lambda: changes.append(len(results)))
    assert results["lost"]["device_lost"] and results["lost"]["rc"] == session.DEVICE_LOST_RC
    assert "device was lost" in session._state(results["lost"])
    assert results["next"]["rc"] == 0
    assert changes == [1, 2]  # session.json is rewritten after each step


def test_pytest_flags_follow_the_installed_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def commands() -> list[list[str]]:
        return [c for s in session.build_plan(tmp_path / "o", tmp_path / "w") for c in s.resolve({}) if "pytest" in c]

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("xdist", "pytest_timeout") else real(name, *a))
    cmds = commands()
    assert cmds and not any("-n" in c or "--timeout" in c for c in cmds)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("xdist", "pytest_timeout") else real(name, *a))
    cmds = commands()
    assert sum("-n" in c for c in cmds) == 2 and sum("--timeout" in c for c in cmds) == 1


def test_steps_ending_together_are_killed_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_killpg = session.os.killpg
    monkeypatch.setattr(session.os, "killpg",
                        lambda pgid, sig: real_killpg(pgid, sig) if sig != session.signal.SIGKILL else None)
    monkeypatch.setattr(session, "KILL_WAIT_S", 1.5)
    log = session._Log(tmp_path / "session.log")
    results: dict = {}
    survivors: list = []
    stuck = [session.Step(f"stuck-{i}", 1, [_sleep(60)], 0.5, tmp_path / f"stuck-{i}.log") for i in range(4)]
    try:
        start = time.monotonic()
        session._run_steps(stuck, results, dict(session.os.environ), start + 30, True, log, survivors=survivors)
        assert time.monotonic() - start < 4.5  # one wait of 1.5 s for all four, not four in a row
        assert all(results[s.name]["not_gone"] for s in stuck) and len(survivors) == 4
        later = [session.Step("timed", 2, [_sleep(0)], 30, tmp_path / "timed.log", min_s=0)]
        session._run_steps(later, results, dict(session.os.environ), time.monotonic() + 30, False, log,
                           survivors=survivors)
        assert results["timed"]["contaminated_by"] == [s.name for s in stuck]
    finally:
        for s in stuck:
            real_killpg(results[s.name]["pgid"], session.signal.SIGKILL)
        for _, r in survivors:
            r.proc.wait(timeout=10)


def test_the_session_fits_its_command(tmp_path: Path) -> None:
    # the deadline, then at worst the kill, the plot from partial rows and the packing: inside the 600 s command
    assert 540 - session.PACK_RESERVE_S + session.KILL_WAIT_S + session.PLOT_TIMEOUT_S + 15 < session.COMMAND_LIMIT_S
    assert session.KILL_WAIT_S + session.PLOT_TIMEOUT_S < session.PACK_RESERVE_S
    steps = session.build_plan(tmp_path / "o", tmp_path / "w")
    assert max(s.timeout_s for s in steps if s.phase == 2) < 540 - 240 - session.PACK_RESERVE_S
    (compiled,) = [s for s in steps if s.name == "compiled"]
    cmd = compiled.resolve({})[0]
    assert cmd[cmd.index("--compile-mode") + 1] == "reduce-overhead"


def _rollout_row(provider: str, median: float, compile_mode: str | None = None) -> dict:
    return {"benchmark": "rssm_imagine", "provider": provider, "compile_mode": compile_mode, "size": "planet",
            "N": 10000, "H": 15, "beliefs": None, "dtype": "bfloat16", "median_ms": median, "frac_floor": 0.9}


def test_best_baseline_is_named_and_compiled_missing_is_not_goal_met() -> None:
    rows = [_rollout_row("eager", 100.0), _rollout_row("graphed", 30.0), _rollout_row("fastwm", 1.0)]
    harness._rollout_speedups(rows)
    fused = rows[-1]
    assert fused["best_baseline"] == "graphed" and fused["baselines_measured"] == ["graphed"]
    line = harness._rollout_summary(rows)
    assert "met by 0 of 1" in line and "compiled was not measured for 1" in line
    rows.append(_rollout_row("compiled", 20.0, "reduce-overhead"))
    harness._rollout_speedups(rows)
    assert fused["best_baseline"] == "compiled[reduce-overhead]"
    assert fused["baselines_measured"] == ["compiled[reduce-overhead]", "graphed"]
    assert fused["speedup_vs_best_baseline"] == 20
    line = harness._rollout_summary(rows)
    assert "met by 1 of 1" in line and "not measured" not in line


def test_the_plot_is_drawn_from_partial_rows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from fastwm.__main__ import main

    bench = tmp_path / "bench"
    assert main(["bench", "--suite", "rollout", "--ops", "imagine", "--N", "64,128", "--H", "3", "--providers",
                 "eager", "--rssm-sizes", "planet", "--quick", "--device", "cpu", "--out", str(bench)]) == 0
    out = tmp_path / "out"
    (out / "rollout").mkdir(parents=True)
    (out / "rollout" / "bench_rollout.partial.json").write_text((bench / "bench_rollout.json").read_text())
    note = session._plot_partial(out, session._Log(tmp_path / "session.log"))
    assert note is not None and note.endswith("drawn"), note
    assert (out / "rollout" / "rollout_throughput.png").stat().st_size > 0
    assert session._plot_partial(out, session._Log(tmp_path / "session.log")) is None  # drawn once


def test_sigterm_still_packs_and_writes_session_json(tmp_path: Path) -> None:
    import signal
    import subprocess

    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.session", "--smoke", "--out", str(out), "--work",
                             str(work), "--budget-s", "300", "--phase1-s", "150"], cwd=session.ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # until phase 1 runs
            lines.append(line)
            if "started" in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    summary = json.loads((out / "session.json").read_text())
    assert summary["stopped"].startswith("signal SIGTERM")
    assert summary["steps"] and all(r["timed_out"] or "skipped" in r or r["rc"] is not None
                                    for r in summary["steps"].values())
    assert any(r.get("killed") == "the session stopped" for r in summary["steps"].values())
    with tarfile.open(out / "extra.tar.gz") as tar:
        assert "logs/session.log" in tar.getnames()
    assert summary["out_problems"] == []
