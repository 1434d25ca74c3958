"""Every kernel compiles for an H100 (sm_90), checked on a machine without a GPU.

The interpreter tests check what the kernels compute but never run Triton's compiler. Here ``fastwm.benchmarks.aot``
drives the public API with a stand-in driver whose target is sm_90, so each launch compiles to a cubin (Triton's
bundled ptxas) instead of running. It runs in a subprocess: the interpreter, set for this test session, never compiles.
Skipped on a GPU machine, where the cuda tests compile and run every kernel anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# (dtype, cells): every cell kind in fp32; each other dtype (a different tl.dot lowering) with one cell kind.
MATRIX = (("float32", ("gru", "layernorm_gru", "none")), ("bfloat16", ("gru",)), ("float16", ("none",)),
          ("float64", ("layernorm_gru",)))
KERNELS = {"_observe_fwd_kernel", "_observe_bwd_kernel", "_observe_split_fwd_kernel", "_observe_split_bwd_kernel",
           "_observe_prior_kernel", "_observe_prior_bwd_kernel", "_step_fwd_kernel", "_step_bwd_kernel",
           "_rollout_kernel", "_gru_cell_fwd_kernel", "_gru_cell_bwd_kernel", "_lngru_cell_fwd_kernel",
           "_lngru_cell_bwd_kernel"}


def test_every_kernel_compiles_for_sm90(device, tmp_path):
    if device.type == "cuda":
        pytest.skip("on a GPU the cuda tests compile and run every kernel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    code = (
        "import json, sys\n"
        "from fastwm.benchmarks.aot import compile_all\n"
        "from dataclasses import asdict\n"
        f"matrix = {MATRIX!r}\n"
        "variants, failures = [], []\n"
        "for dt, cells in matrix:\n"
        "    v, f = compile_all(90, (dt,), cells, ((32, 512, 512),))\n"
        "    variants += v; failures += f\n"
        "json.dump({'variants': [asdict(v) for v in variants], 'failures': failures}, open(sys.argv[1], 'w'))\n"
    )
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True,
                          timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["failures"] == [], result["failures"]
    compiled = {v["kernel"] for v in result["variants"]}
    assert KERNELS <= compiled, f"never compiled: {sorted(KERNELS - compiled)}"
    # each dtype reached the kernels' compute path (COMPUTE=fp64 only from float64 inputs)
    assert any("COMPUTE=fp64" in v["constexprs"] for v in result["variants"])
    # the resource report was read off every cubin (Triton's bundled cuobjdump)
    for v in result["variants"]:
        assert v["registers"] is not None and 0 < v["registers"] <= 255 and v["stack_bytes"] is not None, v
    # observe's forward time loop in fp32 at these sizes, every cell kind: no register spills (a stack frame over the
    # 32 bytes of a Philox draw). Left to its own choice, ptxas capped the GRU and no-cell loops at 128 registers with
    # 208 and 136 bytes of stack, spills read and written every step; the launch's register ceiling (MAXNREG) lifts it.
    loops = [v for v in result["variants"] if v["kernel"] == "_observe_fwd_kernel" and " float32 " in v["scenario"]]
    assert len(loops) == 5, loops  # 3 cell kinds, and the 2 with a deter again with resets to a learned initial state
    for v in loops:
        assert v["stack_bytes"] <= 32, v
    # the resets to a learned initial state in all four time loops
    learned = {v["kernel"] for v in result["variants"] if "HAS_INIT=True" in v["constexprs"]}
    assert learned == {"_observe_fwd_kernel", "_observe_bwd_kernel", "_observe_split_fwd_kernel",
                       "_observe_split_bwd_kernel"}, learned
