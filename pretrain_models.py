"""Pretrain ILQ's two frozen models once (Algorithm 1, lines 2-3), so that many seeds and ablations reuse them: the
dynamics ensemble (Eq. 5) and the diffusion behaviour model (Eq. 6-8).

    python pretrain_models.py                                # the offline default dataset, the paper's settings
    python pretrain_models.py --env-id hopper-medium-replay --dataset-path hopper_medium_replay-v2.hdf5
    python pretrain_models.py --budget cpu                   # the reduced CPU budget of ilq_jax.py

Models land in the cache that ilq_jax.py reads (--model-dir), keyed by dataset fingerprint and model settings;
ilq_jax.py uses a cached model whenever it was trained at least as long as it asks for. A second run here reuses what
is cached (--force retrains). Progress goes to the console and to TensorBoard under runs/pretrain__<dataset>__<time>/.
"""

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import tyro

import ilq_jax


@dataclass
class PretrainArgs:
    """pretrain_models.py's flags: which dataset, the two models' settings, the budget, the cache (the module docstring
    is the --help description)."""

    # the dataset: a D4RL name (hopper-medium-replay), a Minari id, or ilq-local/<robot>/random-v0 (generated here)
    env_id: str = "ilq-local/hopper/random-v0"
    dataset_path: Optional[str] = None  # D4RL-format HDF5 file for a D4RL name (None: the D4RL cache folder, else a download)
    download: bool = True  # --no-download: never download a dataset that is not on disk
    # size of a generated ilq-local/*/random-v0 dataset (as in ilq_jax.py)
    random_dataset_steps: int = ilq_jax.RANDOM_DATASET_STEPS
    # paper: 3e5 diffusion steps and 40 dynamics epochs (Table 3); cpu: ilq_jax.py's reduced budget (2e4 and 10)
    budget: Literal["cpu", "paper"] = "paper"
    dynamics_epochs: Optional[int] = None  # dynamics training epochs (None: from --budget)
    diffusion_steps: Optional[int] = None  # diffusion training steps (None: from --budget)
    dynamics_members: int = 7  # dynamics ensemble members (MOPO's 7)
    dynamics_elites: int = 5  # elite members, chosen by holdout MSE (MOPO's 5)
    dynamics_hidden: int = 200  # width of the dynamics layers (the paper's 200)
    dynamics_layers: int = 4  # hidden layers of the dynamics networks (the paper's 4)
    dynamics_lr: float = 1e-3  # dynamics learning rate (the paper's 1e-3)
    diffusion_k: int = 5  # K, the number of diffusion steps (Diffusion-QL's 5)
    diffusion_lr: float = 3e-4  # diffusion learning rate (the paper's 3e-4)
    pretrain_seed: int = 0  # seed of model pretraining
    model_dir: str = "~/.cache/ilq-jax/models"  # cache of pretrained models (ilq_jax.py's --model-dir)
    force: bool = False  # retrain and overwrite cached models


def pretrain(p: PretrainArgs) -> None:
    # the same names in ilq_jax.Args: resolve_args checks them and fills the budget's defaults
    args = ilq_jax.resolve_args(
        ilq_jax.Args(**{f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "force"})
    )
    data, info = ilq_jax.load_dataset(args)
    print(ilq_jax.describe_dataset(data, info))
    print(
        f"[models] budget '{args.budget}': dynamics {args.dynamics_epochs} epochs ({args.dynamics_members} members, "
        f"{args.dynamics_elites} elites), diffusion {args.diffusion_steps} steps (K={args.diffusion_k}); cache "
        f"{os.path.expanduser(args.model_dir)}"
    )
    log_dir = os.path.join("runs", f"pretrain__{ilq_jax.slug(args.env_id)}__{int(time.time())}")
    tb, t0 = ilq_jax.TensorBoard(log_dir), time.time()
    try:
        ilq_jax.load_or_pretrain(args, data, info, report=ilq_jax.PretrainProgress(tb.scalar), force=p.force)
    finally:
        tb.close()
    print(f"[models] done in {time.time() - t0:.1f}s; TensorBoard logs in {log_dir}")


def main(argv=None) -> None:
    ilq_jax.run_cli(pretrain, tyro.cli(PretrainArgs, args=argv, description=__doc__))


if __name__ == "__main__":
    main()
