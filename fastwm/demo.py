"""``python -m fastwm demo``: train a world model on a gymnasium environment, then imagine and plan with it.

The steps, each printed as it runs:

1. Data: random-action episodes from the environment (Pendulum-v1 by default), stored as sequences; a few more
   episodes with other seeds are held out for evaluation.
2. Training: :class:`fastwm.worldmodel.WorldModel` (encoder, :class:`fastwm.RSSM`, decoder, reward head) on the
   sequence ELBO with free nats, Adam, a progress bar with the ELBO, KL and reconstruction; checkpoints in
   ``--out``, resumable with ``--resume``.
3. Imagination: imagined row-steps per second on the trained model, the fused kernels (on a GPU) against the
   reference path; open-loop predictions against the real observations of a held-out episode.
4. Planning: :class:`fastwm.CEMPlanner` acting in the real environment, against uniform random actions on the same
   initial states.

It writes ``DIR/metrics.json``, ``DIR/*.png`` and ``DIR/checkpoint.pt``. On a machine without a GPU everything runs
on the CPU through the eager reference; on a GPU the same command runs the fused Triton kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._backend import backend as use_backend
from ._backend import triton_available
from .planning import CEMPlanner
from .rssm import State
from .worldmodel import WorldModel

__all__ = ["DemoConfig", "add_arguments", "run", "run_from_args"]


@dataclass
class DemoConfig:
    """Every setting of the demo (the command line's flags, one to one)."""

    env: str = "Pendulum-v1"
    pixels: bool = False
    out: str = "fastwm-demo"
    seed: int = 0
    device: str = "auto"
    # data
    episodes: int = 40
    eval_episodes: int = 4
    episode_steps: int | None = None
    action_repeat: int = 2
    # model
    deter: int = 64
    stoch: int = 16
    hidden: int = 64
    embed: int = 64
    cell: str = "gru"
    depth: int = 32
    free_nats: float = 1.0
    # training
    steps: int = 900
    batch: int = 32
    length: int = 32
    lr: float = 3e-3
    grad_clip: float = 100.0
    checkpoint_every: int = 250
    resume: bool = False
    collect_rounds: int = 2
    collect_episodes: int = 2
    explore_noise: float = 0.3
    # imagination and planning
    imagine_rows: int = 1000
    imagine_horizon: int = 15
    openloop_context: int = 10
    openloop_horizon: int = 30
    plan_episodes: int = 3
    random_episodes: int = 10
    horizon: int = 12
    candidates: int = 250
    iterations: int = 5
    top_k: int = 25
    stochastic_plans: bool = False
    progress: bool | None = None
    quick: bool = False


#: What ``--quick`` changes: a smoke run of every step in seconds (CI runs it).
QUICK: dict[str, Any] = {
    "episodes": 3, "eval_episodes": 1, "episode_steps": 40, "steps": 6, "batch": 4, "length": 8,
    "checkpoint_every": 4, "imagine_rows": 64, "imagine_horizon": 4, "openloop_context": 3, "openloop_horizon": 6,
    "plan_episodes": 1, "random_episodes": 2, "horizon": 4, "candidates": 16, "iterations": 2, "top_k": 4,
    "deter": 16, "stoch": 4, "hidden": 16, "embed": 16, "depth": 4, "collect_rounds": 1, "collect_episodes": 1,
}


# ----------------------------------------------------------------------------------------------------------------------
# The environment
# ----------------------------------------------------------------------------------------------------------------------


def _import_gym() -> Any:
    try:
        import gymnasium
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise SystemExit("the demo needs gymnasium, matplotlib and tqdm: pip install -e \".[demo]\"") from e
    return gymnasium


class Env:
    """A gymnasium environment with actions in [-1, 1], action repeat, and optionally 64x64 image observations."""

    def __init__(self, name: str, *, pixels: bool, action_repeat: int, episode_steps: int | None) -> None:
        gym = _import_gym()
        kw: dict[str, Any] = {}
        if episode_steps is not None:
            kw["max_episode_steps"] = episode_steps
        if pixels:
            kw["render_mode"] = "rgb_array"
        try:
            self.env = gym.make(name, **kw)
        except Exception as e:
            raise SystemExit(f"--env {name!r}: gymnasium cannot make it ({type(e).__name__}: {e})") from e
        space = self.env.action_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise SystemExit(f"--env {name!r}: the demo needs a continuous (Box) action space of shape [A], got "
                             f"{space}")
        if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
            raise SystemExit(f"--env {name!r}: the action space must be bounded, got {space}")
        obs_space = self.env.observation_space
        if not pixels and (not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1):
            raise SystemExit(f"--env {name!r}: vector observations must be a Box of shape [O], got {obs_space}; "
                             "try --pixels")
        self.low, self.high = space.low.astype(np.float64), space.high.astype(np.float64)
        self.action_dim = int(space.shape[0])
        self.pixels, self.action_repeat = pixels, action_repeat
        self.obs_shape: tuple[int, ...] = (3, 64, 64) if pixels else (int(obs_space.shape[0]),)

    def _obs(self, obs: np.ndarray) -> np.ndarray:
        if not self.pixels:
            return np.asarray(obs, dtype=np.float32)
        frame = self.env.render()
        if frame is None:
            raise SystemExit("--pixels: this environment renders no rgb_array frames")
        img = torch.as_tensor(np.ascontiguousarray(frame), dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
        return torch.nn.functional.interpolate(img, size=(64, 64), mode="area")[0].numpy()

    def reset(self, seed: int) -> np.ndarray:
        obs, _ = self.env.reset(seed=seed)
        return self._obs(obs)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """One agent step (``action_repeat`` env steps): action in [-1, 1] -> (obs, summed reward, done)."""
        a = self.low + (np.clip(action, -1.0, 1.0) + 1.0) / 2.0 * (self.high - self.low)
        total, done, obs = 0.0, False, None
        for _ in range(self.action_repeat):
            obs, r, term, trunc, _ = self.env.step(a.astype(self.env.action_space.dtype))
            total += float(r)
            if term or trunc:
                done = True
                break
        return self._obs(obs), total, done

    def close(self) -> None:
        self.env.close()


@dataclass
class Episode:
    """One episode as a sequence: obs[t] with the action that led to it (zeros at t = 0) and the reward received on
    arriving there (0 at t = 0)."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray

    @property
    def ret(self) -> float:
        return float(self.reward.sum())


def run_episode(env: Env, seed: int, act: Callable[[np.ndarray, np.ndarray, bool], np.ndarray]) -> Episode:
    """Run one episode; ``act(obs, prev_action, first)`` returns the next action in [-1, 1]."""
    obs = env.reset(seed)
    prev = np.zeros(env.action_dim, dtype=np.float32)
    obs_l, act_l, rew_l = [obs], [prev], [0.0]
    first, done = True, False
    while not done:
        a = np.asarray(act(obs, prev, first), dtype=np.float32).reshape(env.action_dim)
        obs, r, done = env.step(a)
        obs_l.append(obs)
        act_l.append(a)
        rew_l.append(r)
        prev, first = a, False
    return Episode(np.stack(obs_l), np.stack(act_l), np.asarray(rew_l, dtype=np.float32))


def random_actor(rng: np.random.Generator, action_dim: int) -> Callable[[np.ndarray, np.ndarray, bool], np.ndarray]:
    return lambda obs, prev, first: rng.uniform(-1.0, 1.0, size=action_dim)


class Dataset:
    """Episodes concatenated into one stream; training windows of length L may cross episode boundaries, where
    ``is_first`` resets the RSSM (Dreamer's replay)."""

    def __init__(self, episodes: list[Episode]) -> None:
        self.obs = np.concatenate([e.obs for e in episodes]).astype(np.float32)
        self.action = np.concatenate([e.action for e in episodes]).astype(np.float32)
        self.reward = np.concatenate([e.reward for e in episodes]).astype(np.float32)
        firsts = [np.zeros(len(e.reward), dtype=bool) for e in episodes]
        for f in firsts:
            f[0] = True
        self.is_first = np.concatenate(firsts)

    def extend(self, episodes: list[Episode]) -> None:
        """Append episodes to the stream."""
        more = Dataset(episodes)
        for k in ("obs", "action", "reward", "is_first"):
            setattr(self, k, np.concatenate([getattr(self, k), getattr(more, k)]))

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` steps (what a checkpoint saw)."""
        for k in ("obs", "action", "reward", "is_first"):
            setattr(self, k, getattr(self, k)[:n])

    def __len__(self) -> int:
        return len(self.reward)

    def tensors(self, device: torch.device) -> dict[str, Tensor]:
        return {k: torch.as_tensor(getattr(self, k), device=device)
                for k in ("obs", "action", "reward", "is_first")}

    def save(self, path: Path) -> None:
        np.savez_compressed(path, obs=self.obs, action=self.action, reward=self.reward, is_first=self.is_first)

    @classmethod
    def load(cls, path: Path) -> Dataset:
        with np.load(path) as f:
            ds = cls.__new__(cls)
            ds.obs, ds.action, ds.reward, ds.is_first = f["obs"], f["action"], f["reward"], f["is_first"]
        return ds


def sample_batch(data: dict[str, Tensor], batch: int, length: int, generator: torch.Generator) -> dict[str, Tensor]:
    """``batch`` windows of ``length`` steps at random starts: dict of [B, L, ...] tensors; each window starts fresh
    (is_first at t = 0, as the RSSM starts from its initial state there)."""
    n = data["reward"].shape[0]
    start = torch.randint(0, n - length + 1, (batch,), generator=generator).to(data["reward"].device)
    idx = start[:, None] + torch.arange(length, device=start.device)
    out = {k: v[idx] for k, v in data.items()}
    out["is_first"] = out["is_first"].clone()
    out["is_first"][:, 0] = True
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class History:
    """Per-update training curves (the ELBO is the unmodified per-step bound recon - KL, without free nats)."""

    step: list[int] = field(default_factory=list)
    elbo: list[float] = field(default_factory=list)
    recon: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    collected_at: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _progress(total: int, initial: int, enabled: bool | None) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise SystemExit("the demo needs tqdm: pip install -e \".[demo]\"") from e
    return tqdm(total=total, initial=initial, desc="train", unit="update", disable=(not enabled) if enabled is not None
                else None, dynamic_ncols=True, file=sys.stderr)


def train(model: WorldModel, opt: torch.optim.Optimizer, data: dict[str, Tensor], cfg: DemoConfig, start: int,
          end: int, history: History, generator: torch.Generator, save: Callable[[int], None]) -> None:
    """Adam updates ``start`` .. ``end`` on random windows, checkpointing every ``cfg.checkpoint_every`` and at
    ``end``."""
    params = [p for p in model.parameters() if p.requires_grad]
    pending: list[tuple[int, Tensor]] = []
    t0 = time.perf_counter()

    def flush() -> None:
        if not pending:
            return
        vals = torch.stack([v for _, v in pending]).tolist()
        for (s, _), (elbo, recon, kl) in zip(pending, vals):
            history.step.append(s)
            history.elbo.append(elbo)
            history.recon.append(recon)
            history.kl.append(kl)
        pending.clear()

    with _progress(cfg.steps, start, cfg.progress) as bar:
        for step in range(start, end):
            batch = sample_batch(data, cfg.batch, cfg.length, generator)
            out = model.loss(batch["obs"], batch["action"], batch["reward"], batch["is_first"])
            opt.zero_grad(set_to_none=True)
            out.terms.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            t = out.terms
            pending.append((step + 1, torch.stack([(t.recon - t.kl_raw).detach(), t.recon.detach(),
                                                    t.kl_raw.detach()]).float()))
            if len(pending) >= 10 or step + 1 == end:
                flush()
                bar.set_postfix(elbo=f"{history.elbo[-1]:.2f}", kl=f"{history.kl[-1]:.2f}",
                                recon=f"{history.recon[-1]:.2f}", refresh=False)
            bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                flush()
                history.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save(step + 1)


# ----------------------------------------------------------------------------------------------------------------------
# Imagination and planning
# ----------------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def imagine_throughput(model: WorldModel, rows: int, horizon: int, device: torch.device,
                       generator: torch.Generator) -> dict[str, float | None]:
    """Imagined row-steps per second of ``RSSM.imagine`` from ``rows`` starts: the fused path (one kernel launch for
    the horizon; needs a GPU) and the reference path (the eager per-step loop), on the same model and device."""
    rssm = model.rssm
    init = rssm.initial(1)
    start = State(*(x.expand(rows, -1).contiguous() for x in init))
    actions = torch.rand(rows, horizon, rssm.action_dim, generator=generator).to(device) * 2 - 1
    result: dict[str, float | None] = {}
    names = {"fastwm": "triton", "reference": "reference"}
    for name, be in names.items():
        if be == "triton" and not (device.type == "cuda" and triton_available()):
            result[name] = None
            continue
        with use_backend(be):
            rssm.imagine(actions, start)  # warm-up (and compilation)
            _sync(device)
            reps, t0 = 0, time.perf_counter()
            while reps < 3 or time.perf_counter() - t0 < 0.5:
                rssm.imagine(actions, start)
                reps += 1
            _sync(device)
        result[name] = rows * horizon * reps / (time.perf_counter() - t0)
    return result


@torch.no_grad()
def open_loop(model: WorldModel, episodes: list[Episode], context: int, horizon: int,
              device: torch.device, generator: torch.Generator | None = None) -> dict[str, Any]:
    """Filter ``context`` real steps (posterior samples from ``generator``), then predict ``horizon`` more from the
    real actions alone (the prior's mean path, no noise), from every window start (every ``horizon // 2`` steps) of
    the held-out ``episodes``, batched.

    Returns the first window's real and predicted observations and rewards (for the plot), and the prediction's
    mean squared error in normalised units over all windows: per prediction step and overall."""
    starts = [(e, s) for e in episodes for s in range(0, len(e.reward) - context - horizon + 1, max(1, horizon // 2))]
    if not starts:  # episodes shorter than context + horizon: one shortened window
        ep = episodes[0]
        horizon = max(1, len(ep.reward) - context)
        starts = [(ep, 0)]
    n = context + horizon
    obs = torch.as_tensor(np.stack([e.obs[s:s + n] for e, s in starts]), device=device)
    act = torch.as_tensor(np.stack([e.action[s:s + n] for e, s in starts]), device=device)
    first = torch.zeros(len(starts), context, dtype=torch.bool, device=device)
    first[:, 0] = True
    rssm = model.rssm
    post, _ = rssm.observe(model.embed(obs[:, :context]), act[:, :context], first, generator=generator)
    last = State(*(x[:, -1] for x in post))
    noise = torch.zeros(len(starts), horizon, rssm.stoch, device=device)
    dream = rssm.imagine(act[:, context:], last, noise)
    pred_obs, pred_rew = model.decode(dream), model.predict_reward(dream)
    real_obs = obs[:, context:]
    err = (model.normalize_obs(pred_obs) - model.normalize_obs(real_obs)).square()
    per_step = err.reshape(len(starts), horizon, -1).mean(-1).mean(0)
    ep0, s0 = starts[0]
    return {"real_obs": real_obs[0].cpu().numpy(), "pred_obs": pred_obs[0].cpu().numpy(),
            "real_reward": ep0.reward[s0 + context:s0 + n], "pred_reward": pred_rew[0].cpu().numpy(),
            "mse": float(per_step.mean()), "mse_per_step": per_step.cpu().numpy().tolist(), "windows": len(starts)}


class PlannerActor:
    """Acts in the real environment: filter the observation into the belief, then plan with CEM from it; with
    ``noise`` > 0, Gaussian exploration noise is added to the planned action (PlaNet's data collection). The belief's
    samples come from a generator of its own, seeded with ``seed``: the global one's state depends on what ran before
    (the imagination timing loop runs for a time, not a number of calls), which made the planner's returns vary
    from run to run."""

    def __init__(self, model: WorldModel, planner: CEMPlanner, device: torch.device, noise: float = 0.0,
                 rng: np.random.Generator | None = None, seed: int = 0) -> None:
        self.model, self.planner, self.device = model, planner, device
        self.noise, self.rng = noise, rng
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.state: State | None = None

    @torch.no_grad()
    def __call__(self, obs: np.ndarray, prev: np.ndarray, first: bool) -> np.ndarray:
        rssm = self.model.rssm
        if first or self.state is None:
            self.state = rssm.initial(1)
            self.planner.reset()
            prev = np.zeros_like(prev)
        o = torch.as_tensor(obs, device=self.device)[None]
        a = torch.as_tensor(prev, device=self.device)[None]
        post, _ = rssm.obs_step(self.state, a, self.model.embed(o), generator=self.generator)
        self.state = post
        action = self.planner(post)[0].float().cpu().numpy()
        if self.noise > 0 and self.rng is not None:
            action = np.clip(action + self.noise * self.rng.standard_normal(action.shape), -1.0, 1.0)
        return action


def make_planner(model: WorldModel, cfg: DemoConfig, device: torch.device, seed: int) -> CEMPlanner:
    """The CEM planner of the demo's settings, on the model's RSSM and reward head, with its own generator."""
    return CEMPlanner(model.rssm, model.reward, horizon=cfg.horizon, candidates=cfg.candidates,
                      iterations=cfg.iterations, top_k=cfg.top_k, stochastic=cfg.stochastic_plans,
                      generator=torch.Generator(device=device).manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise SystemExit("the demo needs matplotlib: pip install -e \".[demo]\"") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(history: History, path: Path, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    labels = ("ELBO per step (recon - KL)", "reconstruction log-likelihood", "KL(q || p) per step")
    for ax, key, label in zip(axes, ("elbo", "recon", "kl"), labels):
        y = np.asarray(getattr(history, key))
        ax.plot(history.step, y, lw=0.6, alpha=0.4, color="C0")
        if len(y) >= 20:
            k = max(len(y) // 30, 5)
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(history.step[k - 1:], smooth, lw=1.6, color="C0")
        for j, x in enumerate(history.collected_at):
            ax.axvline(x, color="C3", lw=0.8, ls=":", label="planner episodes added" if j == 0 else None)
        ax.set_xlabel("update")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    if history.collected_at:
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_open_loop(ol: dict[str, Any], context: int, path: Path, title: str, pixels: bool) -> None:
    plt = _plt()
    if pixels:
        n = min(8, len(ol["real_obs"]))
        idx = np.linspace(0, len(ol["real_obs"]) - 1, n).astype(int)
        fig, axes = plt.subplots(2, n, figsize=(1.5 * n, 3.4))
        for j, i in enumerate(idx):
            for row, key in enumerate(("real_obs", "pred_obs")):
                axes[row, j].imshow(np.clip(ol[key][i].transpose(1, 2, 0), 0, 1))
                axes[row, j].axis("off")
            axes[0, j].set_title(f"t+{i + 1}", fontsize=8)
        axes[0, 0].text(-10, 32, "real", ha="right", fontsize=8)
        axes[1, 0].text(-10, 32, "imagined", ha="right", fontsize=8)
    else:
        dims = min(ol["real_obs"].shape[1], 4)  # the first four observation dims, the reward, the error
        fig, axes = plt.subplots(1, dims + 2, figsize=(3.2 * (dims + 2), 3))
        steps = np.arange(1, len(ol["real_obs"]) + 1)
        series = [(ol["real_obs"][:, d], ol["pred_obs"][:, d], f"observation dim {d}") for d in range(dims)]
        series.append((ol["real_reward"], ol["pred_reward"], "reward"))
        for ax, (real, pred, name) in zip(axes, series):
            ax.plot(steps, real, "k-", lw=1.5, label="real")
            ax.plot(steps, pred, "C1--", lw=1.5, label="imagined (open loop)")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel(f"steps after {context} observed")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        ax = axes[-1]
        ax.plot(np.arange(1, len(ol["mse_per_step"]) + 1), ol["mse_per_step"], "C3-", lw=1.5)
        ax.set_title(f"MSE (normalised), mean of {ol['windows']} windows", fontsize=10)
        ax.set_xlabel("prediction step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_returns(plan: list[float], rand: list[float], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for x, vals, name in ((0, rand, "random actions"), (1, plan, "CEM in the latent space")):
        ax.bar(x, np.mean(vals), color=f"C{x}", alpha=0.6, label=name)
        ax.scatter(np.full(len(vals), x), vals, color="k", s=12, zorder=3)
    ax.set_xticks([0, 1], ["random", "CEM planner"])
    ax.set_ylabel("episode return")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def _commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=False)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available")
    return dev


def _say(msg: str) -> None:
    print(msg, flush=True)


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo end to end and return the metrics (also written to ``cfg.out``/metrics.json)."""
    if cfg.quick:
        defaults = DemoConfig()
        for k, v in QUICK.items():
            if getattr(cfg, k) == getattr(defaults, k):  # flags given explicitly win over --quick
                setattr(cfg, k, v)
    _check_config(cfg)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    # One stream per phase, so a resumed run evaluates on the same episodes as an uninterrupted one.
    rng_data, rng_eval, rng_random = (np.random.default_rng([cfg.seed, i]) for i in range(3))
    # On the CPU the eager reference runs (the Triton interpreter is for tests, far too slow here); on a GPU, the
    # fused kernels.
    be = "auto" if device.type == "cuda" else "reference"
    path = "fused Triton kernels" if device.type == "cuda" and triton_available() else "eager reference (PyTorch)"
    _say(f"fastwm demo: {cfg.env}{' (pixels)' if cfg.pixels else ''} on {device} ({_device_name(device)}), "
         f"RSSM path: {path}")
    timings: dict[str, float] = {}

    env = Env(cfg.env, pixels=cfg.pixels, action_repeat=cfg.action_repeat, episode_steps=cfg.episode_steps)
    ckpt_path, data_path = out / "checkpoint.pt", out / "data.npz"
    resume = cfg.resume and ckpt_path.exists() and data_path.exists()
    if cfg.resume and not resume:
        _say(f"--resume: no checkpoint in {out}, starting afresh")

    # 1. Data ---------------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    seeds = iter(range(cfg.seed * 100_003, cfg.seed * 100_003 + 10**6))
    if resume:
        data = Dataset.load(data_path)
        _say(f"[1/4] data: {len(data)} steps loaded from {data_path}")
    else:
        eps = [run_episode(env, next(seeds), random_actor(rng_data, env.action_dim)) for _ in range(cfg.episodes)]
        data = Dataset(eps)
        data.save(data_path)
        _say(f"[1/4] data: {cfg.episodes} random episodes, {len(data)} steps (action repeat {cfg.action_repeat}), "
             f"mean return {np.mean([e.ret for e in eps]):.1f}")
    held_out = [run_episode(env, 10**7 + cfg.seed * 1000 + i, random_actor(rng_eval, env.action_dim))
                for i in range(cfg.eval_episodes)]
    timings["data_s"] = time.perf_counter() - t0
    if len(data) < cfg.length:
        raise SystemExit(f"--length {cfg.length} is longer than the data ({len(data)} steps): collect more "
                         "--episodes")

    # 2. Training -----------------------------------------------------------------------------------------------------
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False) if resume else None
    if ck is None:
        model_kw = {"embed": cfg.embed, "deter": cfg.deter, "stoch": cfg.stoch, "hidden": cfg.hidden,
                    "cell": cfg.cell, "depth": cfg.depth, "free_nats": cfg.free_nats}
    else:  # the checkpoint's sizes win over the flags
        model_kw = {k: v for k, v in ck["model_config"].items() if k not in ("obs_shape", "action_dim")}
    model = WorldModel(env.obs_shape, env.action_dim, **model_kw)
    if ck is None:
        model.set_normalizer(torch.as_tensor(data.obs), torch.as_tensor(data.reward))
    else:
        model.load_state_dict(ck["model"])
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-4)
    history, start, rounds_done = History(), 0, 0
    if ck is not None:
        opt.load_state_dict(ck["optimizer"])
        history = History(**ck["history"])
        start, rounds_done = int(ck["step"]), int(ck["rounds_done"])
        data.truncate(int(ck["data_len"]))  # what the checkpoint saw, should data.npz have been saved after it
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        _say(f"[2/4] resuming from {ckpt_path} at update {start}")
    tensors = data.tensors(device)

    def save(step: int) -> None:
        torch.save({"step": step, "model": model.state_dict(), "model_config": model.config,
                    "optimizer": opt.state_dict(), "history": asdict(history), "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "rounds_done": rounds_done, "data_len": len(data), "demo_config": asdict(cfg)}, ckpt_path)

    n_params = sum(p.numel() for p in model.parameters())
    rounds = cfg.collect_rounds
    _say(f"[2/4] training: {n_params:,} parameters, {cfg.steps - start} Adam updates of {cfg.batch} x {cfg.length} "
         f"windows, sequence ELBO with {cfg.free_nats} free nats"
         + (f"; {rounds} x {cfg.collect_episodes} episodes collected by the planner on the way" if rounds else ""))
    t_collect = 0.0
    if start >= cfg.steps and rounds_done >= rounds:
        _say(f"      the checkpoint already has {start} updates (--steps {cfg.steps}): nothing to train")
    with use_backend(be):
        for i in range(rounds + 1):
            # PlaNet's loop: train, then act in the environment with the planner (plus exploration noise) and add
            # what it saw to the data; the updates are spread evenly over the rounds.
            boundary = cfg.steps * (i + 1) // (rounds + 1)
            if start < boundary:
                train(model, opt, tensors, cfg, start, boundary, history, gen, save)
                start = boundary
            if i < rounds and rounds_done <= i:
                t1 = time.perf_counter()
                actor = PlannerActor(model, make_planner(model, cfg, device, seed=1000 + i), device,
                                     noise=cfg.explore_noise, rng=np.random.default_rng([cfg.seed, 10 + i]),
                                     seed=2000 + i)
                eps = [run_episode(env, 3 * 10**7 + cfg.seed * 1000 + 10 * i + j, actor)
                       for j in range(cfg.collect_episodes)]
                data.extend(eps)
                data.save(data_path)
                tensors = data.tensors(device)
                rounds_done = i + 1
                history.collected_at.append(start)
                t_collect += time.perf_counter() - t1
                save(start)
                _say(f"      round {i + 1}/{rounds}: after {start} updates the planner collected "
                     f"{cfg.collect_episodes} episodes (return {np.mean([e.ret for e in eps]):.1f}, exploration "
                     f"noise {cfg.explore_noise}); data: {len(data)} steps")
    timings["collect_s"] = t_collect
    timings["train_s"] = history.seconds
    k = max(1, min(25, len(history.elbo) // 10))
    elbo_first, elbo_last = float(np.mean(history.elbo[:k])), float(np.mean(history.elbo[-k:]))
    _say(f"      ELBO per step: {elbo_first:.2f} (first {k} updates) -> {elbo_last:.2f} (last {k}) in "
         f"{history.seconds:.0f} s")

    model.eval()
    with use_backend(be), torch.no_grad():
        ev = Dataset(held_out).tensors(device)
        eval_terms = model.loss(ev["obs"][None], ev["action"][None], ev["reward"][None], ev["is_first"][None]).terms
        elbo_eval = float(eval_terms.recon - eval_terms.kl_raw)

    # 3. Imagination --------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    with use_backend(be):
        thr = imagine_throughput(model, cfg.imagine_rows, cfg.imagine_horizon, device, gen)
        # its own generator: the timing above draws from the global one a varying number of times
        ol = open_loop(model, held_out, cfg.openloop_context, cfg.openloop_horizon, device,
                       torch.Generator().manual_seed(cfg.seed + 2))
    timings["imagine_s"] = time.perf_counter() - t0
    fused = "n/a (the fused kernels need a CUDA GPU)" if thr["fastwm"] is None else f"{thr['fastwm']:,.0f}"
    _say(f"[3/4] imagination: {cfg.imagine_rows} rows x {cfg.imagine_horizon} steps, row-steps/s: reference "
         f"{thr['reference']:,.0f}, fused {fused}; open-loop MSE over {len(ol['mse_per_step'])} steps "
         f"(normalised units, {ol['windows']} held-out windows) {ol['mse']:.3f}")

    # 4. Planning -----------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    actor = PlannerActor(model, make_planner(model, cfg, device, seed=cfg.seed), device, seed=cfg.seed + 1)
    eval_seeds = [2 * 10**7 + cfg.seed * 1000 + i for i in range(max(cfg.plan_episodes, cfg.random_episodes))]
    with use_backend(be):
        plan_returns = [run_episode(env, s, actor).ret for s in eval_seeds[:cfg.plan_episodes]]
    timings["plan_s"] = time.perf_counter() - t0
    random_returns = [run_episode(env, s, random_actor(rng_random, env.action_dim)).ret
                      for s in eval_seeds[:cfg.random_episodes]]
    env.close()
    plan_return, random_return = float(np.mean(plan_returns)), float(np.mean(random_returns))
    _say(f"[4/4] planning: CEM (horizon {cfg.horizon}, {cfg.candidates} candidates, {cfg.iterations} iterations, "
         f"top {cfg.top_k}) return {plan_return:.1f} over {cfg.plan_episodes} episodes; random actions "
         f"{random_return:.1f} over {cfg.random_episodes}")

    title = f"{cfg.env}{' (pixels)' if cfg.pixels else ''}, {_device_name(device)}"
    plots = {"training": "training.png", "open_loop": "open_loop.png", "returns": "returns.png"}
    plot_training(history, out / plots["training"], f"fastwm world model training: {title}")
    plot_open_loop(ol, cfg.openloop_context, out / plots["open_loop"], f"open-loop prediction after "
                   f"{cfg.openloop_context} observed steps: {title}", cfg.pixels)
    plot_returns(plan_returns, random_returns, out / plots["returns"], f"returns: {title}")

    timings["total_s"] = time.perf_counter() - t_start
    metrics: dict[str, Any] = {
        "env": cfg.env, "pixels": cfg.pixels, "steps": max(start, cfg.steps), "data_steps": len(data),
        "episodes_random": cfg.episodes, "episodes_planner": rounds_done * cfg.collect_episodes,
        "elbo_first": elbo_first, "elbo_last": elbo_last, "elbo_eval": elbo_eval,
        "plan_return": plan_return, "random_return": random_return,
        "plan_returns": plan_returns, "random_returns": random_returns,
        "openloop_mse": ol["mse"], "openloop_mse_per_step": ol["mse_per_step"], "openloop_windows": ol["windows"],
        "imagine_row_steps_per_s": thr, "imagine_rows": cfg.imagine_rows, "imagine_horizon": cfg.imagine_horizon,
        "rssm_path": path, "device": str(device), "device_name": _device_name(device),
        "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
        "commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "plots": [str(out / f) for f in plots.values()], "checkpoint": str(ckpt_path), "config": asdict(cfg),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _say(f"wrote {out / 'metrics.json'}, {', '.join(plots.values())} and {ckpt_path.name} in {out}")
    return metrics


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return str(triton.__version__)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _check_config(cfg: DemoConfig) -> None:
    for name in ("episodes", "eval_episodes", "action_repeat", "depth", "deter", "stoch", "hidden", "embed", "steps",
                 "batch", "length", "checkpoint_every", "imagine_rows", "imagine_horizon", "openloop_context",
                 "openloop_horizon", "plan_episodes", "random_episodes", "collect_episodes", "horizon", "candidates",
                 "iterations", "top_k"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive int, got {v!r}")
    if cfg.episode_steps is not None and cfg.episode_steps < 2:
        raise SystemExit(f"--episode-steps must be an int >= 2, got {cfg.episode_steps!r}")
    if not isinstance(cfg.collect_rounds, int) or cfg.collect_rounds < 0:
        raise SystemExit(f"--collect-rounds must be an int >= 0, got {cfg.collect_rounds!r}")
    if not (math.isfinite(cfg.explore_noise) and cfg.explore_noise >= 0):
        raise SystemExit(f"--explore-noise must be a float >= 0, got {cfg.explore_noise!r}")
    if cfg.top_k > cfg.candidates:
        raise SystemExit(f"--top-k ({cfg.top_k}) must be at most --candidates ({cfg.candidates})")
    for name in ("lr", "grad_clip"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v > 0):
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive float, got {v!r}")
    if not (math.isfinite(cfg.free_nats) and cfg.free_nats >= 0):
        raise SystemExit(f"--free-nats must be a float >= 0, got {cfg.free_nats!r}")
    if cfg.cell not in ("gru", "layernorm_gru", "none"):
        raise SystemExit(f"--cell must be gru, layernorm_gru or none, got {cfg.cell!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's flags, one per :class:`DemoConfig` field."""
    d = DemoConfig()
    p.add_argument("--env", default=d.env, help="a gymnasium environment id with a continuous action space "
                   f"(default {d.env})")
    p.add_argument("--pixels", action="store_true", help="observe 64x64 rendered frames (rgb_array) instead of the "
                   "state vector; a convolutional encoder and decoder")
    p.add_argument("--out", default=d.out, help=f"output directory: metrics.json, plots, checkpoint (default {d.out})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto (cuda when present, else cpu), cpu or cuda[:i]")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt and DIR/data.npz")
    p.add_argument("--stochastic-plans", action="store_true", help="score the planner's candidates on sampled "
                   "latents (PlaNet) instead of the prior's mean path")
    p.add_argument("--quick", action="store_true", help="a smoke run of every step on a tiny budget (seconds)")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                      help="always show the progress bar (default: only on a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    g = p.add_argument_group("data, model and training")
    for name, help_ in (("episodes", "random-action episodes to train on"),
                        ("eval_episodes", "held-out random episodes (evaluation ELBO, open-loop plot)"),
                        ("episode_steps", "cap the environment's episode length (agent steps x action repeat)"),
                        ("action_repeat", "environment steps per agent step (PlaNet's action repeat)"),
                        ("deter", "RSSM deterministic state"), ("stoch", "RSSM stochastic state"),
                        ("hidden", "RSSM and MLP hidden width"), ("embed", "encoder output width (vectors)"),
                        ("cell", "RSSM cell: gru, layernorm_gru or none"),
                        ("depth", "convolution width of the image encoder and decoder (--pixels)"),
                        ("free_nats", "free nats of the per-step KL"), ("steps", "Adam updates"),
                        ("batch", "sequences per update"), ("length", "steps per sequence"),
                        ("lr", "Adam learning rate"),
                        ("grad_clip", "gradient-norm clip"), ("checkpoint_every", "updates between checkpoints"),
                        ("collect_rounds", "pauses in training for the planner to collect (0: random data only)"),
                        ("collect_episodes", "episodes the planner collects each round"),
                        ("explore_noise", "std of the Gaussian noise added to the planner's actions when collecting")):
        _add(g, name, getattr(d, name), help_)
    g = p.add_argument_group("imagination and planning")
    for name, help_ in (("imagine_rows", "starts for the imagination throughput"),
                        ("imagine_horizon", "horizon for the imagination throughput"),
                        ("openloop_context", "observed steps before the open-loop prediction"),
                        ("openloop_horizon", "open-loop prediction steps"),
                        ("plan_episodes", "episodes acted by the CEM planner"),
                        ("random_episodes", "episodes of uniform random actions"),
                        ("horizon", "CEM planning horizon (agent steps)"), ("candidates", "CEM candidates"),
                        ("iterations", "CEM iterations"), ("top_k", "CEM elites")):
        _add(g, name, getattr(d, name), help_)


def _add(g: Any, name: str, default: Any, help_: str) -> None:
    flag = "--" + name.replace("_", "-")
    typ = int if isinstance(default, int) or default is None else type(default)
    g.add_argument(flag, dest=name, type=typ, default=default, help=f"{help_} (default {default})")


def run_from_args(args: argparse.Namespace) -> int:
    fields = DemoConfig.__dataclass_fields__
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in fields})
    run(cfg)
    return 0

