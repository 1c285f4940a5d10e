#!/usr/bin/env bash
# Prepare, on a CPU machine with network access to PyPI, everything benchmarks/gpu.sh needs on an offline GPU
# machine (Python 3.12, x86-64, a CUDA build of JAX already installed): wheels of the packages such a machine
# lacks, the locally made dataset, and models pretrained on it. Run from the repository root, in its virtualenv:
#
#     python benchmarks/make_datasets.py               # once: ilq-local/hopper/medium-replay-v0 (~13 min)
#     bash benchmarks/gpu_bundle.sh                    # -> .gpu-bundle/ (paper-budget pretraining, ~12 min)
#     bash benchmarks/gpu_bundle.sh DIR --dataset ilq-local/walker2d/medium-replay-v0   # another local dataset
#     bash benchmarks/gpu_bundle.sh DIR --rehearse     # tiny generated dataset and models (CI's rehearsal)
#
# The bundle must stay under 60 MB; this script prints what it holds and fails when it is larger.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-.gpu-bundle}
REHEARSE=0
DATASET=ilq-local/hopper/medium-replay-v0
shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) REHEARSE=1 ;;
    --dataset) DATASET=${2:?--dataset needs a Minari id}; shift ;;
    *) echo "error: unknown argument $1 (usage: gpu_bundle.sh [DIR] [--dataset ID] [--rehearse])" >&2; exit 2 ;;
  esac
  shift
done
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels" "$BUNDLE/minari"
BUNDLE=$(cd "$BUNDLE" && pwd)

# 1. Wheels for CPython 3.12 / manylinux x86-64: what an image with JAX, flax, optax, chex, numpy, h5py, matplotlib
#    and tensorboard lacks. mujoco-studio (a viewer mujoco 4 lists but never imports here) is left out.
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$BUNDLE/wheels" \
  gymnasium==1.4.0 farama-notifications==0.0.6 mujoco==4.0.0 mujoco-core==4.0.0 glfw==2.11.0 pyopengl==3.1.10 \
  minari==0.5.4 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1

# 2. The dataset and 3. models pretrained on it, both inside the bundle.
export MINARI_DATASETS_PATH="$BUNDLE/minari" HF_HUB_OFFLINE=1
if [ "$REHEARSE" = 1 ]; then
  DATASET=ilq-local/hopper/random-v0
  EXTRA=(--random-dataset-steps 2000)
  PRETRAIN=(--dynamics-epochs 1 --diffusion-steps 50 --dynamics-hidden 32)
else
  EXTRA=()
  PRETRAIN=(--budget paper)
  SRC="${ILQ_MINARI_SOURCE:-${HOME}/.minari/datasets}/$DATASET"
  [ -d "$SRC" ] || { echo "error: $SRC not found: make it first with python benchmarks/make_datasets.py" >&2; exit 2; }
  mkdir -p "$BUNDLE/minari/$(dirname "$DATASET")"
  cp -r "$SRC" "$BUNDLE/minari/$DATASET"
fi
python pretrain_models.py --env-id "$DATASET" --model-dir "$BUNDLE/models" "${EXTRA[@]}" "${PRETRAIN[@]}"
rm -rf runs/pretrain__*"$(echo "$DATASET" | tr '/' '_')"*  # pretraining's TensorBoard logs stay on this machine

python - "$BUNDLE" "$DATASET" "${EXTRA[@]}" "${PRETRAIN[@]}" <<'PY'
import json, os, sys, time
bundle, dataset, args = sys.argv[1], sys.argv[2], sys.argv[3:]
json.dump(dict(dataset=dataset, args=args, created=time.strftime("%Y-%m-%d %H:%M:%S")),
          open(os.path.join(bundle, "bundle.json"), "w"), indent=2)
PY
echo "[bundle] $BUNDLE:"
(cd "$BUNDLE" && find . -type f -printf '%10s  %p\n' | sort -k2)
SIZE=$(du -sm "$BUNDLE" | cut -f1)
echo "[bundle] total ${SIZE} MB (limit 60 MB)"
[ "$SIZE" -lt 60 ] || { echo "error: the bundle is ${SIZE} MB, over 60 MB" >&2; exit 1; }
