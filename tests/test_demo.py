"""The main job, ``python -m fastwm demo``, on a tiny budget: every step runs, writes what api.md promises, resumes
exactly, and refuses bad settings with a clear message. Also the pieces it is made of (the dataset windows, the
action scaling, the world model's loss)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium", reason="the demo's dependencies are in the test extra")
pytest.importorskip("matplotlib")

from fastwm.__main__ import main
from fastwm.demo import (
    QUICK,
    Dataset,
    DemoConfig,
    Env,
    Episode,
    PlannerActor,
    make_planner,
    open_loop,
    run,
    sample_batch,
)
from fastwm.worldmodel import WorldModel

API_FIELDS = ("env", "steps", "elbo_first", "elbo_last", "plan_return", "random_return")


def _quick(tmp_path: Path, device: torch.device, **kw) -> DemoConfig:
    return DemoConfig(**{**QUICK, "out": str(tmp_path), "device": device.type, "progress": False, **kw})


def test_quick_run_writes_metrics_plots_and_checkpoint(tmp_path: Path, device: torch.device) -> None:
    metrics = run(_quick(tmp_path, device))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    for name in API_FIELDS:
        assert name in written, name
    assert written["env"] == "Pendulum-v1"
    assert written["steps"] == QUICK["steps"]
    for name in ("elbo_first", "elbo_last", "elbo_eval", "plan_return", "random_return", "openloop_mse"):
        assert math.isfinite(written[name]), (name, written[name])
    assert len(written["plan_returns"]) == QUICK["plan_episodes"]
    assert len(written["random_returns"]) == QUICK["random_episodes"]
    assert written["plan_return"] == pytest.approx(np.mean(written["plan_returns"]))
    # Pendulum's rewards are in [-16.3, 0] per env step, at most episode_steps of them.
    for r in written["plan_returns"] + written["random_returns"]:
        assert -16.3 * QUICK["episode_steps"] <= r <= 0.0
    thr = written["imagine_row_steps_per_s"]
    assert thr["reference"] > 0
    assert (thr["fastwm"] is None) == (device.type != "cuda")
    for plot in written["plots"]:
        data = Path(plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, plot
    ck = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == QUICK["steps"] and len(ck["history"]["elbo"]) == QUICK["steps"]
    assert (tmp_path / "data.npz").exists()


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("crash_at", [3, 6], ids=["before-collection", "after-collection"])
def test_resume_continues_exactly(tmp_path: Path, device: torch.device, monkeypatch: pytest.MonkeyPatch,
                                  crash_at: int) -> None:
    """A run interrupted at update ``crash_at`` and resumed from its last checkpoint ends where an uninterrupted run
    ends: same data (the planner's round included), batches, noise, Adam state and weights."""
    cfg = {"steps": 8, "checkpoint_every": 2, "collect_rounds": 1}  # the planner collects after update 4
    whole = run(_quick(tmp_path / "whole", device, **cfg))
    import fastwm.demo as demo

    real, calls = demo.sample_batch, []

    def crashing(*args, **kw):
        calls.append(1)
        if len(calls) == crash_at:
            raise _Interrupt
        return real(*args, **kw)

    monkeypatch.setattr(demo, "sample_batch", crashing)
    with pytest.raises(_Interrupt):
        run(_quick(tmp_path / "split", device, **cfg))
    monkeypatch.setattr(demo, "sample_batch", real)
    ck = torch.load(tmp_path / "split" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == (crash_at - 1) // 2 * 2 and ck["rounds_done"] == (1 if crash_at > 4 else 0)
    resumed = run(_quick(tmp_path / "split", device, resume=True, **cfg))
    assert resumed["steps"] == 8 and resumed["episodes_planner"] == 1
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert a["history"]["step"] == b["history"]["step"] == list(range(1, 9))
    assert a["history"]["collected_at"] == b["history"]["collected_at"] == [4]
    np.testing.assert_allclose(a["history"]["elbo"], b["history"]["elbo"], rtol=1e-5, atol=1e-5)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-5, msg=k)
    assert resumed["data_steps"] == whole["data_steps"]
    assert resumed["random_returns"] == whole["random_returns"]


def test_resume_without_checkpoint_starts_afresh(tmp_path: Path, device: torch.device,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run(_quick(tmp_path, device, resume=True))
    assert "no checkpoint" in capsys.readouterr().out


def test_pixels_quick_run(tmp_path: Path, device: torch.device) -> None:
    pytest.importorskip("pygame", reason="Pendulum renders rgb_array frames with pygame")
    metrics = run(_quick(tmp_path, device, pixels=True, episodes=2, episode_steps=20, length=6, steps=2,
                         openloop_horizon=4))
    assert metrics["pixels"] is True and math.isfinite(metrics["elbo_last"])
    assert (tmp_path / "open_loop.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--env", "CartPole-v1"], "continuous (Box) action space"),
    (["--env", "NoSuchEnv-v9"], "gymnasium cannot make it"),
    (["--top-k", "20", "--candidates", "10"], "--top-k (20) must be at most --candidates (10)"),
    (["--steps", "0"], "--steps must be a positive int"),
    (["--lr", "nan"], "--lr must be a positive float"),
    (["--cell", "lstm"], "--cell must be gru, layernorm_gru or none"),
    (["--length", "500", "--episodes", "1"], "--length 500 is longer than the data"),
])
def test_bad_settings_exit_with_a_clear_message(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--quick", "--no-progress", "--device", "cpu", "--out", str(tmp_path), *argv])
    assert message in str(exc.value)


def test_quick_keeps_explicit_flags(tmp_path: Path) -> None:
    metrics = run(DemoConfig(quick=True, out=str(tmp_path), device="cpu", progress=False, steps=3,
                             random_episodes=3))
    assert metrics["steps"] == 3 and len(metrics["random_returns"]) == 3
    assert metrics["config"]["candidates"] == QUICK["candidates"]


# ----------------------------------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------------------------------


def _episodes(lengths: list[int], obs_dim: int = 3, seed: int = 0) -> list[Episode]:
    rng = np.random.default_rng(seed)
    return [Episode(rng.normal(size=(n, obs_dim)).astype(np.float32), rng.normal(size=(n, 1)).astype(np.float32),
                    rng.normal(size=n).astype(np.float32)) for n in lengths]


def test_dataset_windows_are_contiguous_and_start_fresh() -> None:
    eps = _episodes([7, 5, 9])
    ds = Dataset(eps)
    assert len(ds) == 21 and ds.is_first.nonzero()[0].tolist() == [0, 7, 12]
    data = ds.tensors(torch.device("cpu"))
    batch = sample_batch(data, 64, 6, torch.Generator().manual_seed(1))
    assert batch["obs"].shape == (64, 6, 3) and batch["action"].shape == (64, 6, 1)
    assert batch["reward"].shape == (64, 6) and batch["is_first"].dtype == torch.bool
    assert bool(batch["is_first"][:, 0].all())
    for b in range(64):
        # Locate the window in the stream by its rewards, then check every field and the episode starts inside it.
        start = int(np.flatnonzero(np.isclose(ds.reward, float(batch["reward"][b, 0])))[0])
        sl = slice(start, start + 6)
        np.testing.assert_array_equal(batch["obs"][b].numpy(), ds.obs[sl])
        np.testing.assert_array_equal(batch["action"][b].numpy(), ds.action[sl])
        np.testing.assert_array_equal(batch["is_first"][b, 1:].numpy(), ds.is_first[sl][1:])
    assert not torch.equal(batch["is_first"], data["is_first"][:6].expand(64, -1))  # windows do cross episodes


def test_dataset_save_load_roundtrip(tmp_path: Path) -> None:
    ds = Dataset(_episodes([4, 6]))
    ds.save(tmp_path / "d.npz")
    back = Dataset.load(tmp_path / "d.npz")
    for k in ("obs", "action", "reward", "is_first"):
        np.testing.assert_array_equal(getattr(back, k), getattr(ds, k))


def test_env_scales_actions_to_the_bounds_and_repeats() -> None:
    env = Env("Pendulum-v1", pixels=False, action_repeat=3, episode_steps=9)
    obs = env.reset(seed=3)
    assert obs.shape == (3,) and env.action_dim == 1
    pend = env.env.unwrapped
    for a, torque in ((-1.0, -2.0), (1.0, 2.0), (0.25, 0.5), (5.0, 2.0)):
        env.step(np.array([a]))
        assert float(pend.last_u) == pytest.approx(torque)
    _, _, done = env.step(np.array([0.0]))  # 4 agent steps x 3 = 12 env steps > 9
    assert done
    env.close()


@pytest.mark.parametrize("obs_shape", [(3,), (3, 64, 64)], ids=["vector", "pixels"])
def test_world_model_loss_reaches_every_parameter(obs_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = WorldModel(obs_shape, 2, embed=8, deter=8, stoch=4, hidden=8, depth=2, free_nats=0.0)
    obs = torch.rand(2, 5, *obs_shape)
    model.set_normalizer(obs, torch.randn(2, 5))
    first = torch.zeros(2, 5, dtype=torch.bool)
    first[:, 0] = True
    out = model.loss(obs, torch.rand(2, 5, 2) * 2 - 1, torch.randn(2, 5), first)
    assert out.terms.loss.dim() == 0 and torch.isfinite(out.terms.loss)
    torch.testing.assert_close(out.terms.recon, out.obs_log_prob + out.reward_log_prob)
    out.terms.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_acting_and_open_loop_ignore_the_global_rng() -> None:
    """The acting belief and the open-loop filtering sample from generators of their own: what ran before (the
    demo's time-bound imagination timing draws from the global generator a varying number of times) changes neither
    the actions nor the prediction error."""
    torch.manual_seed(0)
    model = WorldModel((3,), 1, embed=8, deter=8, stoch=4, hidden=8, depth=2, free_nats=0.0)
    cfg = DemoConfig(**{**QUICK, "candidates": 16, "top_k": 4, "iterations": 2, "horizon": 3})
    obs, prev = np.array([0.1, -0.2, 0.3], dtype=np.float32), np.zeros(1, dtype=np.float32)
    runs = []
    for draws in (0, 7):
        torch.randn(draws)
        actor = PlannerActor(model, make_planner(model, cfg, torch.device("cpu"), seed=3), torch.device("cpu"), seed=4)
        actions = np.stack([actor(obs, prev, t == 0) for t in range(3)])
        assert actor.state is not None
        runs.append((actions, actor.state.stoch))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1]), "the belief sample depends on the global generator"
    errors = []
    for draws in (0, 7):
        torch.randn(draws)
        ol = open_loop(model, _episodes([12, 14]), 4, 6, torch.device("cpu"), torch.Generator().manual_seed(5))
        errors.append(ol["mse_per_step"])
    assert errors[0] == errors[1], "the open-loop filtering depends on the global generator"


def test_world_model_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="obs_shape"):
        WorldModel((3, 32, 32), 1)
    with pytest.raises(ValueError, match="free_nats"):
        WorldModel((3,), 1, free_nats=-1.0)


def test_normalizer_statistics() -> None:
    model = WorldModel((2,), 1)
    obs = torch.tensor([[[0.0, 10.0], [2.0, 30.0]]])
    model.set_normalizer(obs, torch.tensor([[1.0, 3.0]]))
    torch.testing.assert_close(model.normalize_obs(obs).mean((0, 1)), torch.zeros(2))
    torch.testing.assert_close(model.denormalize_reward(torch.tensor(0.0)), torch.tensor(2.0))


def test_normalizer_of_a_single_observation_is_finite() -> None:
    # One observation (and one reward) has no spread: std 1, not torch's NaN for one row, so the loss stays finite.
    model = WorldModel((3,), 1)
    obs = torch.tensor([[[1.0, -2.0, 4.0]]])
    model.set_normalizer(obs, torch.tensor([[0.5]]))
    assert torch.equal(model.obs_std, torch.ones(3)) and torch.equal(model.reward_std, torch.ones(()))
    assert torch.equal(model.normalize_obs(obs), torch.zeros(1, 1, 3))
