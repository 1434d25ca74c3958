#!/usr/bin/env bash
# A lent GPU now comes with 15 minutes of device time in all, its start included: there, run the whole session as
# ONE command, `FASTWM_COMMIT=<sha> python3 -m benchmarks.session --out "$OUT"` (benchmarks/session.py: the tests,
# the feature split and the compilation in parallel, then the timings, under a 540 s deadline; timeout_s 600).
# The parts below are for a longer lease, one part per command.
#
# The GPU session's runbook: each part fits one 10-minute command on a lent GPU machine (torch, triton, numpy,
# pytest, pytest-xdist, matplotlib there; no registry). Results land under $OUT (default gpu_out/): copy them into
# benchmarks/results/ with the commit they were run at.
#
#   FASTWM_COMMIT=<sha> bash benchmarks/gpu_session.sh PART [PART ...]
#
# Parts, in the order to run them:
#   split        first, alone: observe's feature-split forward loop against the float64 reference on cuda. Its
#                programs meet at grid barriers, never run on a GPU before: a hang is killed after 180 s (and then
#                run tune with TUNE_ARGS=--no-split)
#   tests        pytest --device cuda over every other test (8 workers: compilation is CPU-bound)
#   tune         benchmarks.tune: warps, tiles and the feature split against the defaults (fix the defaults before
#                benching)
#   observe      bench rssm, observe only (fwd, fwd_bwd; both sizes; fp32, bf16; every provider); where one
#                command's 10 minutes may not hold both sizes, run observe-planet and observe-dreamerv3 instead
#                (rows under $OUT/observe-<size>/). Every suite rewrites its rows so far to *.partial.json after
#                each case, so a part killed at the limit still returns what it measured
#   steps        bench rssm, img_step and obs_step
#   rollout      bench rollout: imagine, imagine_return, cem_decision, and the throughput plot
#   demo         python -m fastwm demo on cuda (needs gymnasium and farama-notifications carried as wheels in .whl/:
#                see the device tool's README for the pip download line)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR="$PWD/.triton-cache"
py=python3
if ! $py -c "import fastwm.kernels" 2>/dev/null; then
  $py -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || {
    cat "$OUT/install.log"; exit 1; }
fi
$py - <<'EOF' | tee "$OUT/versions.txt"
import torch, triton
print("device", torch.cuda.get_device_name(), "sms", torch.cuda.get_device_properties(0).multi_processor_count)
print("torch", torch.__version__, "triton", triton.__version__)
EOF
status=0
for part in "$@"; do
  echo "=== $part"
  case "$part" in
    split)
      timeout -s KILL 180 $py -m pytest tests/test_observe.py -k feature_split --device cuda -q -p no:cacheprovider \
        2>&1 | tee "$OUT/split.log" | tail -20 ;;
    tests)
      $py -m pytest tests --device cuda -q -n 8 -p no:cacheprovider -k "not feature_split" 2>&1 |
        tee "$OUT/tests.log" | tail -40 ;;
    tune)
      $py -m benchmarks.tune --out "$OUT" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" ;;
    observe)
      $py -m fastwm bench --suite rssm --ops observe --out "$OUT" 2>&1 | tee "$OUT/bench_observe.log" | tail -60 ;;
    observe-planet|observe-dreamerv3)
      size=${part#observe-}
      $py -m fastwm bench --suite rssm --ops observe --rssm-sizes "$size" --out "$OUT/$part" 2>&1 |
        tee "$OUT/bench_$part.log" | tail -60 ;;
    steps)
      $py -m fastwm bench --suite rssm --ops img_step,obs_step --out "$OUT" 2>&1 | tee "$OUT/bench_steps.log" |
        tail -60 ;;
    rollout)
      $py -m fastwm bench --suite rollout --out "$OUT" 2>&1 | tee "$OUT/bench_rollout.log" | tail -60 ;;
    demo)
      if [ -d .whl ]; then
        $py -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
      fi
      $py -m fastwm demo --device cuda --out "$OUT/demo" 2>&1 | tee "$OUT/demo.log" | tail -30 ;;
    *)
      echo "unknown part: $part (split, tests, tune, observe, observe-planet, observe-dreamerv3, steps, rollout," \
        "demo)"; status=2 ;;
  esac
  rc=$?  # pipefail: the part's own status, not tee's or tail's
  [ "$rc" -eq 0 ] || status=1
done
exit $status
