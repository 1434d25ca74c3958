"""Bytes that ``RSSM.observe`` keeps for its backward, per row-step, counted by autograd's saved-tensor hooks.

Every tensor autograd saves for the backward passes through ``torch.autograd.graph.saved_tensors_hooks``; this counts
the distinct storages among them, leaving out the parameters, the inputs and the outputs (which the caller holds
anyway). It runs on any device (memory does not depend on speed): the eager reference, which keeps what each
``nn.Linear``, activation and GRU cell saves, against the fused observe, with and without ``recompute``.

    python -m benchmarks.saved_memory          # the sizes of the observe benchmarks, a table
"""

from __future__ import annotations

import argparse
import sys

import torch

import fastwm
from fastwm.observe import saved_bytes

__all__ = ["measure_saved_bytes", "main"]

# (name, stoch, deter, hidden, embed, batch, length): the observe benchmarks' sizes (issue 5)
SIZES = (("dreamerv3 16x64", 32, 512, 512, 1024, 16, 64), ("planet 50x50", 30, 200, 200, 1024, 50, 50))


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.numel()}


def measure_saved_bytes(rssm: fastwm.RSSM, embed: torch.Tensor, action: torch.Tensor, *, backend: str,
                        recompute: bool = False, is_first: torch.Tensor | None = None) -> int:
    """Total bytes of the distinct storages autograd keeps for observe's backward, beyond the parameters, the inputs
    (embed, action, is_first, the initial state) and the outputs."""
    state = rssm.initial(embed.shape[0])
    held = _storages([*rssm.parameters(), embed, action, is_first, *state])
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if t.numel():
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fastwm.backend(backend):
        post, prior, kl = rssm.observe(embed, action, is_first, state, return_kl=True, recompute=recompute)
    held |= _storages([*post, *prior, kl])
    return sum(n for ptr, n in seen.items() if ptr not in held)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saved_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--cells", nargs="+", default=["gru", "layernorm_gru"])
    args = parser.parse_args(argv)
    dt = getattr(torch, args.dtype)
    print(f"{'size':18s} {'cell':14s} {'eager':>10s} {'fastwm':>10s} {'recompute':>10s}   bytes per row-step "
          f"({args.dtype}; eager measured, fastwm from fastwm.observe.saved_bytes)")
    for name, s, d, hd, e, b, t_len in SIZES:
        for cell in args.cells:
            m = fastwm.RSSM(6, e, stoch=s, deter=d, hidden=hd, cell=cell, norm=cell == "layernorm_gru", dtype=dt)
            embed, action = torch.randn(b, t_len, e, dtype=dt), torch.randn(b, t_len, 6, dtype=dt)
            eager = measure_saved_bytes(m, embed, action, backend="reference") / (b * t_len)
            print(f"{name:18s} {cell:14s} {eager:10.0f} {saved_bytes(m):10d} {saved_bytes(m, recompute=True):10d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
