"""Pretrain ILQ's two frozen models once (Algorithm 1, lines 2-3), so that many seeds and ablations reuse them: the
dynamics ensemble (Eq. 5) and the diffusion behaviour model (Eq. 6-8).

    python pretrain_models.py                                # the offline default dataset, the paper's settings
    python pretrain_models.py --env-id hopper-medium-replay --dataset-path hopper_medium_replay-v2.hdf5
    python pretrain_models.py --budget cpu                   # the reduced CPU budget of ilq_jax.py

Models land in the cache that ilq_jax.py reads (--model-dir), keyed by dataset fingerprint and model settings;
ilq_jax.py uses a cached model whenever it was trained at least as long as it asks for, and keeps its own copy in each
run folder (so --force, which retrains and replaces cached models, never changes a run). A second run here reuses what
is cached. Progress goes to the console and, for what was trained, to TensorBoard under runs/pretrain__<dataset>__<time>/.
"""

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Literal

import ilq_jax


@dataclass
class PretrainFlags(ilq_jax.ModelFlags):
    """The two models (Algorithm 1, lines 2-3): their settings, the budget, the cache that ilq_jax.py reads."""

    # paper: 3e5 diffusion steps and 40 dynamics epochs (Table 3); cpu: ilq_jax.py's reduced budget (2e4 and 10)
    budget: Literal["cpu", "paper"] = "paper"
    force: bool = False  # retrain and replace cached models (runs keep their own copies)


@dataclass
class PretrainArgs(ilq_jax.DataFlags, PretrainFlags):
    """pretrain_models.py's flags: ilq_jax.py's own data and model flags, the budget, --force."""


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
    curves, t0 = [], time.time()
    try:
        ilq_jax.load_or_pretrain(args, data, info, force=p.force, curves=curves)
    finally:  # the curves of what was trained, even when a signal ended the rest
        if curves:
            ilq_jax.tensorboard_writer(log_dir, curves).close()
    print(f"[models] done in {time.time() - t0:.1f}s" + (f"; TensorBoard logs in {log_dir}" if curves else ""))


def main(argv=None) -> None:
    ilq_jax.run_cli(lambda: pretrain(ilq_jax.parse_flags(PretrainArgs, argv, __doc__)))


if __name__ == "__main__":
    main()
