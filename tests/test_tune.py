"""benchmarks.tune applies each variant's launch configuration to every kernel module and restores the defaults."""

from __future__ import annotations

import pytest
from fastwm.benchmarks import tune
from fastwm.kernels import observe, rollout, rssm

MODULES = (rssm, observe, rollout)


def _config() -> dict[str, object]:
    return {"warps": [m.NUM_WARPS_STEP for m in MODULES], "maxnreg": [rssm.MAXNREG, observe.MAXNREG],
            "loop": (observe.LOOP_BLOCK_N, observe.LOOP_BLOCK_K), "split": observe.FEATURE_SPLIT,
            "tiles": rollout._rollout_tiles}


@pytest.mark.parametrize("case", ["observe", "imagine", "cem"])
def test_each_variant_is_applied_then_restored(case: str) -> None:
    before = _config()
    variants = tune.variants_for(case)
    assert variants[0].name == tune.DEFAULT
    assert any(v.maxnreg == 0 for v in variants)  # ptxas's own register ceiling is timed in every case
    for v in variants:
        with tune._launch_config(v):
            now = _config()
            if v.num_warps_step is not None:
                assert now["warps"] == [v.num_warps_step] * 3
            if v.maxnreg is not None:
                assert now["maxnreg"] == [v.maxnreg or None] * 2
            if v.observe_tiles is not None:
                assert now["loop"] == v.observe_tiles
            if v.feature_split is not None:
                assert now["split"] == v.feature_split
            if v.rollout_tiles is not None:
                assert now["tiles"](10**6, None, False, True) == v.rollout_tiles
            if v.name == tune.DEFAULT:
                assert now == before
        assert _config() == before

