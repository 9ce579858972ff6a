#!/usr/bin/env bash
# The accelerator benchmark in one go: bash benchmarks/accelerator.sh OUT_DIR
#
# Made for a GPU machine as it is (no network; its own Python and jax): run it there with
# the repository and .wheels/ (bash benchmarks/collect_wheels.sh, here) carried along.
#   1. Environment: where grain or ml_collections is missing, a virtualenv over the
#      machine's packages gets them from .wheels/ (OUT_DIR/venv).
#   2. Seconds-long checks first: versions and imports (benchmarks/versions_check.py), a
#      quick subset of the tests, then the whole kit in its tiny mode.
#   3. The base model's training step in bfloat16 and float32 at two batch sizes each,
#      without and with remat (one benchmarks/step.py run per dtype and batch, remat as its
#      --compare, timed in turns), each beside `ssast_jax.plan`'s roofline estimate for the
#      device (their ratio calibrates the plan); the loader at both batch sizes.
# Writes step_*.json, loader_b*.json, summary.json and table.txt to OUT_DIR and prints one
# table line per step. Uses the GPU when nvidia-smi sees one (JAX_PLATFORMS chooses
# otherwise); sized for about 8 minutes on an H100.
# SSAST_BENCH_TINY=1: only the tiny mode (a tiny model on 64 x 64 inputs), for a CPU check;
# SSAST_BENCH_BATCHES="12 48" (bfloat16) and SSAST_BENCH_FP32_BATCHES="12 24": batch sizes.
set -euo pipefail

out=${1:?usage: benchmarks/accelerator.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

if [[ -z ${JAX_PLATFORMS:-} ]] && command -v nvidia-smi >/dev/null \
    && nvidia-smi -L >/dev/null 2>&1; then
  export JAX_PLATFORMS=cuda  # fail rather than fall back to the CPU
fi

py=${PYTHON:-$(command -v python || command -v python3)}
if ! "$py" -c 'import grain, ml_collections, tensorboardX' 2>/dev/null; then
  if [[ ! -d .wheels ]]; then
    echo "error: $py lacks grain, ml_collections or tensorboardX and there is no .wheels/" \
         "(make it with bash benchmarks/collect_wheels.sh and carry it)" >&2
    exit 1
  fi
  echo "== installing grain, ml_collections, tensorboardX from .wheels/ into $out/venv" >&2
  "$py" -m venv --system-site-packages "$out/venv"
  "$out/venv/bin/python" -m pip install --quiet --no-index --find-links .wheels \
    grain ml_collections tensorboardX >&2
  py="$out/venv/bin/python"
fi

echo "== versions and imports" >&2
"$py" benchmarks/versions_check.py > "$out/versions.txt"
cat "$out/versions.txt" >&2
echo "== a quick subset of the tests" >&2
"$py" -m pytest -q -x -p no:cacheprovider tests/test_masking.py >&2

run_kit() {  # OUT BF16_BATCHES FP32_BATCHES TINY
  local dir=$1 bf16=$2 fp32=$3 tiny=$4 model timing frames bins clips loader_steps
  mkdir -p "$dir"
  if [[ $tiny == 1 ]]; then
    model=(--config.model.size=tiny --config.model.depth=1 --config.data.target_length=64
           --config.data.num_mel_bins=64 --config.mask_patch=6 --config.eval_mask_patch=6)
    timing=(--steps=2 --warmup_steps=1)
    frames=64 bins=64 clips=24 loader_steps=(--steps=5 --warmup=1)
  else
    model=(--config.model.size=base)
    timing=(--steps=6 --warmup_steps=2)
    frames=1024 bins=128 clips=120 loader_steps=(--steps=100 --warmup=10)
  fi
  for dtype in bfloat16 float32; do
    local batches=$bf16
    [[ $dtype == float32 ]] && batches=$fp32
    for batch in $batches; do
      echo "== step, batch $batch, $dtype, remat off and on" >&2
      "$py" benchmarks/step.py --config=configs/pretrain_joint.py "${model[@]}" \
        --config.dtype="$dtype" --config.batch_size="$batch" "${timing[@]}" \
        --compare=remat=True --out="$dir/step_${dtype}_b$batch.json" >/dev/null \
        || echo "   (failed: out of memory?)" >&2
    done
  done
  echo "== synthetic shards ($clips clips of $frames x $bins)" >&2
  "$py" -m ssast_jax.data.demo --out "$dir/demo" --num-clips "$clips" \
    --target-length "$frames" --num-mel-bins "$bins" >&2
  "$py" -m ssast_jax.data.convert --json "$dir/demo/train.json" --pt-dir "$dir/demo/train" \
    --out "$dir/shards" --workers 2 --overwrite >&2
  for batch in $(echo "$bf16 $fp32" | tr ' ' '\n' | sort -nu); do
    echo "== loader, batch $batch" >&2
    "$py" benchmarks/loader.py --shards "$dir/shards" --batch-size "$batch" \
      --target-length "$frames" "${loader_steps[@]}" --out "$dir/loader_b$batch.json" >/dev/null
  done
  "$py" benchmarks/accelerator_table.py "$dir"
}

if [[ ${SSAST_BENCH_TINY:-0} == 1 ]]; then
  run_kit "$out" "${SSAST_BENCH_BATCHES:-8 16}" "${SSAST_BENCH_FP32_BATCHES:-8}" 1
else
  echo "== the tiny mode first (seconds)" >&2
  run_kit "$out/tiny" "8" "8" 1 >/dev/null
  run_kit "$out" "${SSAST_BENCH_BATCHES:-12 48}" "${SSAST_BENCH_FP32_BATCHES:-12 24}" 0
fi
