"""The README's Python examples run as written (device moved to the test's), so that the documentation cannot drift
from the API: every ```python block under the headings below is executed in order, in one namespace, after a prelude
that defines the names the README leaves to the reader (an encoder, a decoder, an actor, a reward head, the
observations). On the CPU the world-model examples run on the reference backend (their shapes, 50 x 50 sequences
at PlaNet's sizes, are far past what the Triton interpreter does in a test's time); the Quickstart's small Gaussian
ops run the interpreted kernels. On cuda everything runs the kernels.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch

import fastwm

README = Path(__file__).resolve().parent.parent / "README.md"

# The headings whose examples run (each example runs in README order, in one namespace).
SECTIONS = ("Quickstart", "The RSSM", "The sequence ELBO", "Latent overshooting (PlaNet)", "Imagination and planning",
            "Mixed precision (`torch.autocast`)")

# What the README leaves to the reader, at the README's sizes (the RSSM example: B = T = 50, stoch 30, deter 200,
# 6 actions, 1024-wide embeddings). ``decoder`` and ``encoder`` go through a 3 x 4 x 4 "image".
PRELUDE = """
import torch
from torch import nn
_gen = torch.Generator().manual_seed(0)
_feat = 30 + 200
_dec = nn.Linear(_feat, 3 * 4 * 4).to(DEVICE)
def decoder(feat):
    return _dec(feat).unflatten(-1, (3, 4, 4))
def decoder_log_prob(feat):
    return fastwm.gaussian_log_prob(obs, decoder(feat), event_dims=3)
_enc = nn.Linear(3 * 4 * 4, 1024).to(DEVICE)
def encoder(obs):
    return _enc(obs.flatten(-3))
actor = nn.Linear(_feat, 6).to(DEVICE)
_reward = nn.Linear(_feat, 1).to(DEVICE)
def reward_head(feat):
    return _reward(feat).squeeze(-1)
obs = torch.randn(50, 50, 3, 4, 4, generator=_gen).to(DEVICE)
scale = 0.1  # the overshooting term's weight
"""

# Set up before a section's example: the names it takes from the text around it.
BEFORE = {
    "Imagination and planning": "actions = torch.zeros(50, 15, 6, device=DEVICE).uniform_(-1, 1)\n"
                                "belief = fastwm.State(*(t[:3].detach() for t in start))\n",
    # the planning example named its decision `action`; autocast's observe reads the sequences' actions again
    "Mixed precision (`torch.autocast`)": "planned = action\naction = torch.randn(50, 50, 6, device=DEVICE)\n",
}


def _examples() -> list[tuple[str, str]]:
    """(heading, code) of every ```python block of README.md, under the heading it follows."""
    found: list[tuple[str, str]] = []
    heading = ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        match = re.match(r"^#{2,3} (.*)$", line)
        if match:
            heading = match.group(1).strip()
        elif line.strip() == "```python":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            found.append((heading, "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return found


def _on(device: torch.device, code: str) -> str:
    """The example moved to ``device``: "cuda" becomes its type, ``.cuda()`` becomes ``.to(DEVICE)``."""
    return code.replace('"cuda"', repr(device.type)).replace(".cuda()", ".to(DEVICE)")


def test_readme_has_the_examples() -> None:
    headings = [h for h, _ in _examples()]
    for section in SECTIONS:
        assert section in headings, f"README.md has no python example under {section!r} (found {headings})"


def test_readme_examples_run(device: torch.device) -> None:
    examples = [(h, c) for h, c in _examples() if h in SECTIONS]
    namespace: dict[str, object] = {"DEVICE": device, "fastwm": fastwm, "torch": torch}
    torch.manual_seed(0)
    exec(compile(PRELUDE, "<prelude>", "exec"), namespace)
    for heading, code in examples:
        exec(compile(BEFORE.get(heading, ""), f"<before {heading}>", "exec"), namespace)
        # The interpreter runs the Quickstart's small ops; the world model's examples need the reference on a CPU.
        reference = device.type == "cpu" and heading != "Quickstart"
        with fastwm.backend("reference") if reference else contextlib.nullcontext():
            try:
                exec(compile(_on(device, code), f"<README: {heading}>", "exec"), namespace)
            except Exception as exc:  # name the section, keep the traceback
                pytest.fail(f"README example under {heading!r} raised {type(exc).__name__}: {exc}")
    # What the examples claim to produce, spot-checked: shapes the comments give, and finite values.
    post, dream, action = namespace["post"], namespace["dream"], namespace["planned"]
    assert post.deter.shape == (50, 50, 200) and post.stoch.shape == (50, 50, 30)
    assert dream.stoch.shape == (50, 15, 30)
    assert isinstance(action, torch.Tensor) and action.shape == (3, 6) and torch.isfinite(action).all()
    assert bool(((action >= -1) & (action <= 1)).all())
    loss = namespace["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert namespace["rssm"].inp.weight.grad is not None  # the autocast example's backward reached the weights
