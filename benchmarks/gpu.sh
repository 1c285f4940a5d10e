#!/usr/bin/env bash
# One prepared command that measures ILQ on one NVIDIA GPU, offline, in at most 9 minutes of wall time:
#
#     bash benchmarks/gpu.sh OUTDIR               # on the GPU machine, from the repository root
#     bash benchmarks/gpu.sh OUTDIR --rehearse    # on CPU at a tiny budget (CI runs this)
#
# It needs the bundle made beforehand by benchmarks/gpu_bundle.sh (wheels, dataset, pretrained models; default
# .gpu-bundle/, or $ILQ_GPU_BUNDLE) and a Python 3.12 with a CUDA build of JAX, flax, optax, chex, numpy, h5py,
# matplotlib and tensorboard ($PYTHON, default python3). What it lacks is installed from the bundle's wheels into
# a temporary folder (no network). It writes into OUTDIR (7 files):
#   speed.md / speed.json: updates/s for 1 and 1000 updates per call, fresh samples and --behavior-bank, 1 and 8
#     vmapped seeds, the protocol batch of 3 methods x 5 seeds; then that 15-learner batch up close
#     (benchmarks/batch_study.py): ILQ x 1, 3, 5, 15 seeds in the same program; one line per variant of the batch
#     (--bf16-models, --sample-chunk 1 / 50, jax_default_matmul_precision "highest", and each in its own process
#     XLA_FLAGS --xla_gpu_enable_command_buffer= (off) / =+WHILE,+CONDITIONAL and --xla_gpu_autotune_level=0), the
#     maths-changing ones with their max abs difference after one call; a jax.profiler trace of one call (the 20
#     most expensive kernels with their share, kernels per update); seconds per evaluation round of 15 learners x
#     10 episodes with 1 and 4 worker processes against the training time between two evaluations;
#   protocol.md, curves.png and summary.json: benchmarks/protocol.py, ILQ and its two ablations x 5 seeds as one
#     program on the bundle's dataset, time-boxed; runs.tar.gz: its logs and TensorBoard files; log.txt.
# $ILQ_GPU_DEADLINE_S (default 480) bounds the measurements after the install: the protocol gets at least 4 minutes
# of it, the speed part starts no measurement that would cut into them (its rows say what it left out).
set -euo pipefail
OUT=${1:?usage: bash benchmarks/gpu.sh OUTDIR [--rehearse]}
REHEARSE=$([ "${2:-}" = "--rehearse" ] && echo 1 || echo 0)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=$(cd "${ILQ_GPU_BUNDLE:-$ROOT/.gpu-bundle}" 2>/dev/null && pwd) || BUNDLE=""
PY=${PYTHON:-python3}
[ -n "$BUNDLE" ] && [ -f "$BUNDLE/bundle.json" ] || {
  echo "error: no bundle at ${ILQ_GPU_BUNDLE:-$ROOT/.gpu-bundle}: make it on a CPU machine with bash benchmarks/gpu_bundle.sh" >&2
  exit 2
}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MINARI_DATASETS_PATH="$BUNDLE/minari" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# Several processes share the GPU in the learning run: no process may take most of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if ! "$PY" -c "import gymnasium, mujoco, minari, tyro" 2>/dev/null; then
  SITE=$(mktemp -d)/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$BUNDLE"/wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "[gpu] installed $(ls "$BUNDLE"/wheels | wc -l) wheels from the bundle into $SITE"
fi
"$PY" - "$REHEARSE" <<'PY'
import sys
import jax
if sys.argv[1] == "0" and jax.default_backend() != "gpu":
    sys.exit(f"error: JAX sees no GPU (backend {jax.default_backend()}, devices {jax.devices()}). This command "
             "measures a GPU; on a CPU machine use --rehearse. For NVIDIA: pip install -U 'jax[cuda12]'.")
from importlib.metadata import version
import gymnasium as gym
gym.make("Hopper-v5").reset(seed=0)  # the evaluation env works before minutes are spent on measurements
print(f"[gpu] JAX {jax.__version__} on {jax.default_backend()}: {[d.device_kind for d in jax.devices()]}; "
      + ", ".join(f"{p} {version(p)}" for p in ("jaxlib", "flax", "optax", "chex", "numpy", "gymnasium", "mujoco")))
PY
cd "$ROOT"
"$PY" benchmarks/gpu_run.py --out "$OUT" --bundle "$BUNDLE" --deadline-s "${ILQ_GPU_DEADLINE_S:-480}" \
  $([ "$REHEARSE" = 1 ] && echo --rehearse) 2>&1 \
  | tee "$OUT/log.txt"
