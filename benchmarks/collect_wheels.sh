#!/usr/bin/env bash
# The wheels the GPU image lacks, for its Python 3.12 (manylinux x86-64), into .wheels/
# (ignored by git; the device tool carries it: at most 64 MiB travel per run).
#
#   bash benchmarks/collect_wheels.sh [DIR]
#
# The image has jax 0.11.2 (CUDA 13), flax, optax, orbax-checkpoint, numpy, torch and most of
# their dependencies, but not grain (and its array-record and portpicker), ml_collections or
# tensorboardX; benchmarks/accelerator.sh installs these from DIR when they are missing. The
# versions are requirements.txt's where it pins them, else those pip resolves here.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.wheels}
mkdir -p "$dest"
pin() {  # the version requirements.txt pins for $1, or the installed one
  grep -i "^$1==" requirements.txt | head -1 || python -m pip show "$1" 2>/dev/null \
    | awk -v n="$1" '/^Version:/ {print n "==" $2}'
}
packages=($(pin grain) $(pin ml_collections) $(pin tensorboardX) $(pin array_record)
          $(pin portpicker))
python -m pip download --quiet --dest "$dest" --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  "${packages[@]}"
size=$(du -sm "$dest" | cut -f1)
echo "${packages[*]} -> $dest ($size MiB)"
if (( size > 60 )); then
  echo "error: $dest holds $size MiB; the device tool carries at most 64 MiB" >&2
  exit 1
fi
