"""Pretrain ILQ's two frozen models once (Algorithm 1, lines 2-3), so many seeds and ablations reuse them.

    python pretrain_models.py                                # the offline default dataset, paper settings
    python pretrain_models.py --env-id hopper-medium-replay --dataset-path hopper_medium_replay-v2.hdf5
    python pretrain_models.py --budget cpu                   # the reduced CPU budget of ilq_jax.py

Models land in the cache that ilq_jax.py reads (--model-dir), keyed by dataset fingerprint and model
settings; ilq_jax.py uses a cached model whenever it was trained at least as long as it asks for. A second
run here reuses what is cached (--force retrains). Progress goes to the console and to TensorBoard under
runs/pretrain__<dataset>__<time>/.
"""

import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Literal

import tyro

import ilq_jax


@dataclass
class PretrainArgs(ilq_jax.Args):
    budget: Literal["cpu", "paper"] = "paper"
    """`paper`: 3e5 diffusion steps and 40 dynamics epochs (Table 3); `cpu`: ilq_jax.py's reduced budget"""
    force: bool = False
    """retrain and overwrite cached models"""


def main(argv=None) -> None:
    args = tyro.cli(PretrainArgs, args=argv)
    try:
        args = ilq_jax.resolve_args(args)
        data, info = ilq_jax.load_dataset(args)
        print(ilq_jax.describe_dataset(data, info))
        print(f"[models] budget '{args.budget}': dynamics {args.dynamics_epochs} epochs "
              f"({args.dynamics_members} members, {args.dynamics_elites} elites), diffusion {args.diffusion_steps} "
              f"steps (K={args.diffusion_k}); cache {os.path.expanduser(args.model_dir)}")
        log_dir = os.path.join("runs", f"pretrain__{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.env_id)}__{int(time.time())}")
        tb = ilq_jax.TensorBoard(log_dir)
        t0 = time.time()
        try:
            ilq_jax.load_or_pretrain(args, data, info, log=tb.scalar, force=args.force)
        finally:
            tb.close()
        print(f"[models] done in {time.time() - t0:.1f}s; TensorBoard logs in {log_dir}")
    except ilq_jax.ILQError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
