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
    # every phase-2 bench command is warmed, with the same arguments, by every warm shard
    warm = [s for s in steps if s.name.startswith("warm-")]
    assert len(warm) == 8
    for step in (s for s in steps if s.phase == 2 and s.name != "tune"):
        (timed,) = step.resolve({})
        args = timed[timed.index("bench") + 1:timed.index("--out")]
        for i, w in enumerate(warm):
            assert [*args, "--warm-only", "--shard", f"{i}/8", "--out", session.os.devnull] in \
                [c[c.index("bench") + 1:] for c in w.resolve({}) if "bench" in c], step.name
    tune_step = next(s for s in steps if s.name == "tune")
    assert "--no-split" in tune_step.resolve({"split": {"rc": 1}})[0]
    assert "--no-split" not in tune_step.resolve({"split": {"rc": 0}})[0]


def test_check_plan_names_a_bad_command(tmp_path: Path) -> None:
    bad = [session.Step("x", 2, [[sys.executable, "-m", "fastwm", "bench", "--providers", "nope"]], 10,
                        tmp_path / "x.log"),
           session.Step("y", 2, [[sys.executable, "-m", "fastwm.benchmarks.tune", "--variants", "zzz"]], 10,
                        tmp_path / "y.log"),
           session.Step("z", 1, [[sys.executable, "-m", "pytest", "tests/test_nothing_here.py"]], 10,
                        tmp_path / "z.log")]
    problems = session.check_plan(bad)
    assert len(problems) == 3
    assert "providers" in problems[0] and "variants" in problems[1] and "test_nothing_here" in problems[2]


def _sleep(seconds: float, rc: int = 0) -> list[str]:
    return [sys.executable, "-c", f"import time, sys; time.sleep({seconds}); sys.exit({rc})"]


def test_scheduler_limits_dependencies_and_deadline(tmp_path: Path) -> None:
    log = session._Log(tmp_path / "session.log")
    results: dict = {}
    phase1 = [session.Step("slow", 1, [_sleep(60)], 1.0, tmp_path / "slow.log"),
              session.Step("fails", 1, [_sleep(0, 3), _sleep(0)], 30, tmp_path / "fails.log"),
              session.Step("needs-fails", 1, [_sleep(0)], 30, tmp_path / "n.log", after="fails"),
              session.Step("needs-quick", 1, [_sleep(0)], 30, tmp_path / "q.log", after="quick"),
              session.Step("quick", 1, [_sleep(0.2)], 30, tmp_path / "quick.log")]
    start = time.monotonic()
    session._run_steps(phase1, results, dict(session.os.environ), start + 30, True, log)
    assert time.monotonic() - start < 20  # the sleeper was killed at its 1 s limit
    assert results["slow"]["timed_out"] and results["slow"]["rc"] is None
    assert results["fails"]["rc"] == 3  # the first failing command's status, and the second still ran
    assert (tmp_path / "fails.log").read_text().count("# exit") == 2
    assert "skipped" in results["needs-fails"]
    assert results["needs-quick"]["rc"] == 0 and results["quick"]["rc"] == 0
    # phase 2: one at a time; a step that needs more than is left is skipped, the deadline stops the one running
    phase2 = [session.Step("a", 2, [_sleep(60)], 100, tmp_path / "a.log", min_s=0.5),
              session.Step("b", 2, [_sleep(0)], 100, tmp_path / "b.log", min_s=5.0)]
    start = time.monotonic()
    session._run_steps(phase2, results, dict(session.os.environ), start + 1.5, False, log)
    assert results["a"]["timed_out"]
    assert "skipped" in results["b"]


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


def test_smoke_session_on_the_cpu(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    rc = session.main(["--smoke", "--out", str(out), "--work", str(work), "--budget-s", "300", "--phase1-s", "150"])
    summary = json.loads((out / "session.json").read_text())
    assert rc == 0, summary
    assert {n: r["rc"] for n, r in summary["steps"].items()} == {"tests": 0, "warm-0": 0, "warm-1": 0, "rssm": 0}
    files, problems = session.out_files(out)
    assert problems == [] and summary["out_problems"] == []
    rows = json.loads((out / "rssm" / "bench_rssm.json").read_text())
    assert {r["provider"] for r in rows} == {"eager", "fastwm"}
    with tarfile.open(out / "extra.tar.gz") as tar:
        assert "logs/warm-0.log" in tar.getnames()
    assert "passed" in (out / "tests.log").read_text()
