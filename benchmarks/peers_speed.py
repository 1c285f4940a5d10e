"""d3rlpy (PyTorch) peers for benchmarks/speed.py: updates/s of TD3+BC, IQL and CQL at ILQ's sizes.

Runs in the peers virtualenv (benchmarks/requirements-peers.txt) and prints one JSON line:

    .venv-peers/bin/python benchmarks/peers_speed.py --steps 300

Batch 256, 3 x 256 hidden units in every network, hopper sizes (11-dim states, 3-dim actions), 100k random
transitions. Timed: `algo.update(batch)` on batches sampled beforehand, so d3rlpy's sampling is not counted (its
conversion of the numpy batch to tensors, and its scalers, are: they are part of every d3rlpy update). One-off
setup (building the networks, fitting the scalers through a 1-step `fit`) and 5 warm-up updates are not timed.
The algorithms' settings are peers_learn.make_algo's (the ones benchmarks/compare.py trains with).
"""

import argparse
import json
import time

import d3rlpy
import numpy as np
import torch
from peers_learn import make_algo


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu:0")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    n = 100_000
    terminals = np.zeros(n, np.float32)
    timeouts = np.zeros(n, np.float32)
    timeouts[999::1000] = 1.0
    dataset = d3rlpy.dataset.MDPDataset(
        rng.normal(size=(n, 11)).astype(np.float32),
        rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        rng.normal(size=n).astype(np.float32),
        terminals,
        timeouts,
    )
    out = {}
    for name in ("TD3+BC", "IQL", "CQL"):
        algo = make_algo(name, 0)
        if a.device != "cpu:0":  # make_algo builds on the CPU; the same config on the accelerator
            algo = algo.config.create(device=a.device)
        # one fit step builds the networks and fits the observation/reward scalers, as a user's run would
        algo.fit(
            dataset,
            n_steps=1,
            n_steps_per_epoch=1,
            show_progress=False,
            save_interval=10**9,
            logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        )
        batches = [dataset.sample_transition_batch(256) for _ in range(128)]
        for b in batches[:5]:  # warm-up
            algo.update(b)
        rates = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for i in range(a.steps):
                algo.update(batches[i % len(batches)])
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            rates.append(a.steps / (time.perf_counter() - t0))
        out[name] = float(np.median(rates))
    print(
        json.dumps(
            dict(
                updates_per_s=out,
                repeats=a.repeats,
                device=a.device,
                versions=dict(d3rlpy=d3rlpy.__version__, torch=torch.__version__, threads=torch.get_num_threads()),
            )
        )
    )


if __name__ == "__main__":
    main()
