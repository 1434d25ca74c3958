"""A complete world model built on :class:`fastwm.RSSM`: encoder, RSSM, decoder and reward head, trained with the
sequence ELBO (:func:`fastwm.sequence_elbo`).

This is the model ``python -m fastwm demo`` trains; it is small enough to read in one sitting and serves as the
example of wiring fastwm's layers into a training loop::

    model = WorldModel(obs_shape=(3,), action_dim=1)
    terms = model.loss(obs, action, reward, is_first)      # [B, T, ...] batches
    terms.loss.backward()

Observations are vectors (an MLP encoder and decoder) or ``[3, 64, 64]`` images in [0, 1] (PlaNet's convolutional
encoder and decoder). The decoder and the reward head are unit-variance Gaussians, as in PlaNet and Dreamer; both
log-likelihoods count as reconstruction. The reward head is a plain MLP, so the planners run it inside the rollout
kernel on the GPU.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .elbo import ELBOTerms, gaussian_log_prob, sequence_elbo
from .rssm import RSSM, State

__all__ = ["WorldModel", "WorldModelLoss"]


def _mlp(inp: int, hidden: int, out: int, layers: int = 2) -> nn.Sequential:
    """``layers`` Linear layers with ELU between them (a plain MLP that :func:`fastwm.rollout.pack_mlp` accepts)."""
    mods: list[nn.Module] = []
    width = inp
    for _ in range(layers - 1):
        mods += [nn.Linear(width, hidden), nn.ELU()]
        width = hidden
    mods.append(nn.Linear(width, out))
    return nn.Sequential(*mods)


class ConvEncoder(nn.Module):
    """PlaNet's image encoder: four 4x4 stride-2 convolutions, ReLU, [.., 3, 64, 64] -> [.., 32 * depth]."""

    def __init__(self, depth: int = 32) -> None:
        super().__init__()
        d = depth
        self.net = nn.Sequential(
            nn.Conv2d(3, d, 4, 2), nn.ReLU(), nn.Conv2d(d, 2 * d, 4, 2), nn.ReLU(),
            nn.Conv2d(2 * d, 4 * d, 4, 2), nn.ReLU(), nn.Conv2d(4 * d, 8 * d, 4, 2), nn.ReLU(), nn.Flatten())
        self.out_dim = 32 * d

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-3]
        return self.net(x.reshape(-1, *x.shape[-3:])).reshape(*lead, self.out_dim)


class ConvDecoder(nn.Module):
    """PlaNet's image decoder: a Linear layer then four transposed convolutions, [.., F] -> [.., 3, 64, 64]."""

    def __init__(self, feature_dim: int, depth: int = 32) -> None:
        super().__init__()
        d = depth
        self.fc = nn.Linear(feature_dim, 32 * d)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(32 * d, 4 * d, 5, 2), nn.ReLU(), nn.ConvTranspose2d(4 * d, 2 * d, 5, 2), nn.ReLU(),
            nn.ConvTranspose2d(2 * d, d, 6, 2), nn.ReLU(), nn.ConvTranspose2d(d, 3, 6, 2))

    def forward(self, f: Tensor) -> Tensor:
        lead = f.shape[:-1]
        x = self.fc(f).reshape(-1, self.fc.out_features, 1, 1)
        return self.net(x).reshape(*lead, 3, 64, 64)


class WorldModelLoss(NamedTuple):
    """What :meth:`WorldModel.loss` returns: the ELBO terms, the two reconstruction parts and the posterior."""

    terms: ELBOTerms
    obs_log_prob: Tensor
    reward_log_prob: Tensor
    post: State


class WorldModel(nn.Module):
    """Encoder, :class:`fastwm.RSSM`, decoder and reward head, with observation and reward normalisation.

    Args:
        obs_shape: ``(O,)`` for vector observations, ``(3, 64, 64)`` for images (values in [0, 1]).
        action_dim: A; actions are expected in [-1, 1].
        embed: the encoder's output width (vector observations; images give 32 * depth).
        deter, stoch, hidden, cell: the RSSM's sizes and cell (see :class:`fastwm.RSSM`).
        depth: the convolution width of the image encoder and decoder.
        free_nats: the free-nats floor of the per-step KL (``kl_loss`` mode "per_step": Kaixhin's PlaNet and TorchRL
            use 3.0).
        kl_scale: the weight of the KL term.

    The normalisation statistics (``set_normalizer``) are buffers, so they travel with ``state_dict()``.
    """

    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, *, embed: int = 64, deter: int = 64,
                 stoch: int = 16, hidden: int = 64, cell: str = "gru", depth: int = 32, free_nats: float = 3.0,
                 kl_scale: float = 1.0) -> None:
        super().__init__()
        obs_shape = tuple(int(s) for s in obs_shape)
        if len(obs_shape) == 1 and obs_shape[0] >= 1:
            self.pixels = False
        elif obs_shape == (3, 64, 64):
            self.pixels = True
        else:
            raise ValueError(f"obs_shape must be (O,) for vectors or (3, 64, 64) for images, got {obs_shape}")
        if not (isinstance(free_nats, (int, float)) and math.isfinite(free_nats) and free_nats >= 0):
            raise ValueError(f"free_nats must be a float >= 0, got {free_nats!r}")
        self.obs_shape = obs_shape
        self.config: dict[str, Any] = {
            "obs_shape": list(obs_shape), "action_dim": action_dim, "embed": embed, "deter": deter, "stoch": stoch,
            "hidden": hidden, "cell": cell, "depth": depth, "free_nats": float(free_nats), "kl_scale": float(kl_scale)}
        self.free_nats, self.kl_scale = float(free_nats), float(kl_scale)
        if self.pixels:
            self.encoder: nn.Module = ConvEncoder(depth)
            embed = self.encoder.out_dim
        else:
            self.encoder = _mlp(obs_shape[0], hidden, embed)
        self.rssm = RSSM(action_dim, embed, stoch=stoch, deter=deter, hidden=hidden, cell=cell)
        feat = self.rssm.feature_dim
        self.decoder: nn.Module = ConvDecoder(feat, depth) if self.pixels else _mlp(feat, hidden, obs_shape[0])
        self.reward = _mlp(feat, hidden, 1, layers=3)
        stat_shape = (1,) if self.pixels else obs_shape
        self.register_buffer("obs_mean", torch.zeros(stat_shape))
        self.register_buffer("obs_std", torch.ones(stat_shape))
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))

    # ------------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_normalizer(self, obs: Tensor, reward: Tensor) -> None:
        """Set the observation and reward statistics from data (vectors: per dim; images: pixels to [-0.5, 0.5])."""
        if self.pixels:
            self.obs_mean.fill_(0.5)
            self.obs_std.fill_(1.0)
        else:
            flat = obs.reshape(-1, self.obs_shape[0]).float()
            self.obs_mean.copy_(flat.mean(0))
            # one observation has no spread: std 1, as for the reward (torch's std would be NaN)
            self.obs_std.copy_(flat.std(0).clamp_min(1e-3) if flat.shape[0] > 1 else torch.ones_like(self.obs_std))
        r = reward.reshape(-1).float()
        self.reward_mean.copy_(r.mean())
        self.reward_std.copy_(r.std().clamp_min(1e-3) if r.numel() > 1 else torch.ones(()))

    def normalize_obs(self, obs: Tensor) -> Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def denormalize_obs(self, x: Tensor) -> Tensor:
        return x * self.obs_std + self.obs_mean

    def denormalize_reward(self, r: Tensor) -> Tensor:
        return r * self.reward_std + self.reward_mean

    def embed(self, obs: Tensor) -> Tensor:
        """obs [..., *obs_shape] (raw) -> embeddings [..., E]."""
        return self.encoder(self.normalize_obs(obs))

    def decode(self, state: State) -> Tensor:
        """The decoder's mean, in raw observation units."""
        return self.denormalize_obs(self.decoder(self.rssm.features(state)))

    def predict_reward(self, state: State) -> Tensor:
        """The reward head's mean, in raw reward units: [...]."""
        return self.denormalize_reward(self.reward(self.rssm.features(state)).squeeze(-1))

    def loss(self, obs: Tensor, action: Tensor, reward: Tensor, is_first: Tensor) -> WorldModelLoss:
        """The sequence ELBO of a batch: obs [B, T, *obs_shape], action [B, T, A] (action[:, t] led to obs[:, t]),
        reward [B, T] (received on arriving at obs[:, t]), is_first [B, T] bool."""
        post, prior = self.rssm.observe(self.embed(obs), action, is_first)
        feat = self.rssm.features(post)
        obs_lp = gaussian_log_prob(self.normalize_obs(obs), self.decoder(feat), event_dims=len(self.obs_shape))
        r = ((reward - self.reward_mean) / self.reward_std)[..., None]
        rew_lp = gaussian_log_prob(r, self.reward(feat))
        terms = sequence_elbo(obs_lp + rew_lp, post, prior, free_nats=self.free_nats, kl_scale=self.kl_scale)
        return WorldModelLoss(terms, obs_lp.detach().mean(), rew_lp.detach().mean(), post)
