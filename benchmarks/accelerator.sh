#!/usr/bin/env bash
# The accelerator benchmark in one go: bash benchmarks/accelerator.sh OUT_DIR
#
# Times the training step of the base model in bfloat16 at batch 12 and 48, each without
# and with remat (one benchmarks/step.py run per batch, remat as its --compare, timed in
# turns), with MFU against the matmul peak measured in bfloat16 on the same device; then
# the loader (benchmarks/loader.py) at both batch sizes over a small synthetic shard set
# made in OUT_DIR. Writes step_b*.json, loader_b*.json, summary.json and table.txt to
# OUT_DIR and prints one table line per run. Uses the GPU when nvidia-smi sees one (set
# JAX_PLATFORMS to choose); sized to finish inside 8 minutes on an H100/H200.
# SSAST_BENCH_TINY=1: a tiny model on 64 x 64 inputs and small batches, for a CPU check;
# SSAST_BENCH_BATCHES="12 48": the batch sizes.
set -euo pipefail

out=${1:?usage: benchmarks/accelerator.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

if [[ -z ${JAX_PLATFORMS:-} ]] && command -v nvidia-smi >/dev/null \
    && nvidia-smi -L >/dev/null 2>&1; then
  export JAX_PLATFORMS=cuda  # fail rather than fall back to the CPU
fi

if [[ ${SSAST_BENCH_TINY:-0} == 1 ]]; then
  model=(--config.model.size=tiny --config.model.depth=1 --config.data.target_length=64
         --config.data.num_mel_bins=64 --config.mask_patch=6 --config.eval_mask_patch=6)
  batches=(8 16) timing=(--steps=2 --warmup_steps=1)
  frames=64 bins=64 clips=24 loader_steps=(--steps=5 --warmup=1)
else
  model=(--config.model.size=base)
  batches=(12 48) timing=(--steps=10 --warmup_steps=2)
  frames=1024 bins=128 clips=120 loader_steps=(--steps=100 --warmup=10)
fi
if [[ -n ${SSAST_BENCH_BATCHES:-} ]]; then
  read -ra batches <<<"$SSAST_BENCH_BATCHES"
fi

for batch in "${batches[@]}"; do
  echo "== step, batch $batch, bfloat16, remat off and on" >&2
  python benchmarks/step.py --config=configs/pretrain_joint.py "${model[@]}" \
    --config.dtype=bfloat16 --config.batch_size="$batch" "${timing[@]}" \
    --compare=remat=True --out="$out/step_b$batch.json" >/dev/null
done

echo "== synthetic shards ($clips clips of $frames x $bins)" >&2
python -m ssast_jax.data.demo --out "$out/demo" --num-clips "$clips" \
  --target-length "$frames" --num-mel-bins "$bins" >&2
python -m ssast_jax.data.convert --json "$out/demo/train.json" --pt-dir "$out/demo/train" \
  --out "$out/shards" --workers 2 --overwrite >&2
for batch in "${batches[@]}"; do
  echo "== loader, batch $batch" >&2
  python benchmarks/loader.py --shards "$out/shards" --batch-size "$batch" \
    --target-length "$frames" "${loader_steps[@]}" --out "$out/loader_b$batch.json" >/dev/null
done

python - "$out" "${batches[@]}" <<'EOF' | tee "$out/table.txt"
import json, pathlib, sys

out, batches = pathlib.Path(sys.argv[1]), sys.argv[2:]
rows = []
for batch in batches:
  step = json.loads((out / f'step_b{batch}.json').read_text())
  loader = json.loads((out / f'loader_b{batch}.json').read_text())
  for run in (step, step['compared']):
    rows.append({'batch': run['batch_size'], 'remat': run['remat'], 'dtype': run['dtype'],
                 'step_ms': 1e3 * run['step_s'], 'clips_per_s': run['clips_per_s'],
                 'tflops': run['achieved_flops'] / 1e12, 'mfu': run['mfu'],
                 'peak_tflops': run['matmul_peak_flops'] / 1e12,
                 'memory_gib': run['peak_memory_bytes'] / 2**30, 'compile_s': run['compile_s'],
                 'loader_clips_per_s': loader['clips_per_s'],
                 'platform': run['platform'], 'device_kind': run['device_kind']})
  rows[-1]['remat_speedup'] = step['compared_speedup']
print(f'{"batch":>5} {"remat":>5} {"step ms":>9} {"clips/s":>8} {"TFLOP/s":>8} {"MFU":>6} '
      f'{"peak TFLOP/s":>12} {"GiB":>6} {"compile s":>9} {"loader clips/s":>14}  device')
for r in rows:
  print(f'{r["batch"]:5d} {str(r["remat"]):>5} {r["step_ms"]:9.2f} {r["clips_per_s"]:8.1f} '
        f'{r["tflops"]:8.2f} {r["mfu"]:6.3f} {r["peak_tflops"]:12.1f} {r["memory_gib"]:6.2f} '
        f'{r["compile_s"]:9.1f} {r["loader_clips_per_s"]:14.1f}  {r["platform"]} '
        f'{r["device_kind"]} {r["dtype"]}')
(out / 'summary.json').write_text(json.dumps(rows, indent=1) + '\n')
EOF
