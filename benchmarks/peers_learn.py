"""d3rlpy peers for benchmarks/compare.py: TD3+BC, IQL or CQL on the data compare.py exported, evaluated like ILQ.

Runs in the peers virtualenv (benchmarks/requirements-peers.txt), never in ilq-jax's own environment:

    .venv-peers/bin/python benchmarks/peers_learn.py --algo IQL --data runs/compare__<dataset>__data.npz \
        --seed 1 --updates 20000 --eval-interval 1000 --out peer.json

Settings: d3rlpy's own D4RL reproduction settings for each algorithm, with ILQ's batch size (256) and network
sizes (3 x 256 hidden units for every actor, critic and value network).
"""

import argparse
import json
import logging
import time

import d3rlpy
import gymnasium as gym
import numpy as np
import structlog
import torch

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # d3rlpy's info logs


def make_algo(name: str, seed: int):
    d3rlpy.seed(seed)
    enc = d3rlpy.models.VectorEncoderFactory(hidden_units=[256, 256, 256])
    if name == "TD3+BC":
        cfg = d3rlpy.algos.TD3PlusBCConfig(
            batch_size=256,
            actor_encoder_factory=enc,
            critic_encoder_factory=enc,
            observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
        )
    elif name == "IQL":
        cfg = d3rlpy.algos.IQLConfig(
            batch_size=256,
            actor_encoder_factory=enc,
            critic_encoder_factory=enc,
            value_encoder_factory=enc,
            reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0),
        )
    elif name == "CQL":
        cfg = d3rlpy.algos.CQLConfig(
            batch_size=256,
            actor_encoder_factory=enc,
            critic_encoder_factory=enc,
            actor_learning_rate=1e-4,
            critic_learning_rate=3e-4,
            conservative_weight=5.0,
        )
    else:
        raise SystemExit(f"unknown algorithm {name}")
    return cfg.create(device="cpu:0")


def episodes_to_mdp(d) -> "d3rlpy.dataset.MDPDataset":
    """compare.py's flat transitions are episodes laid end to end; an episode ends at a termination or where the
    next row does not continue it (a truncation)."""
    obs, nxt, term = d["observations"], d["next_observations"], d["terminals"] > 0.5
    cont = np.zeros(len(obs), bool)
    cont[:-1] = np.all(nxt[:-1] == obs[1:], axis=1)
    timeouts = ~term & ~cont
    return d3rlpy.dataset.MDPDataset(
        observations=obs,
        actions=d["actions"],
        rewards=d["rewards"],
        terminals=term.astype(np.float32),
        timeouts=timeouts.astype(np.float32),
    )


def evaluate(algo, env_id: str, episodes: int, seed: int, model_fields: dict) -> np.ndarray:
    """Episodes of the greedy policy on env_id; model_fields (e.g. ilq_jax's restored -v2 body masses, saved by
    compare.py) are copied into its MuJoCo model first, so the peers are evaluated on ILQ's robot."""
    env = gym.make(env_id)
    if model_fields:
        import mujoco

        model = env.unwrapped.model
        for name, value in model_fields.items():
            getattr(model, name)[:] = value
        mujoco.mj_setConst(model, env.unwrapped.data)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, ret = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(algo.predict(obs[None].astype(np.float32))[0])
            ret += r
            done = term or trunc
        returns.append(ret)
    env.close()
    return np.asarray(returns)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", required=True, choices=["TD3+BC", "IQL", "CQL"])
    p.add_argument("--data", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--updates", type=int, default=20_000)
    p.add_argument("--eval-interval", type=int, default=1_000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)  # a learning run beside others on a small machine: spinning OpenMP threads starve each other
    d = np.load(a.data)
    ref_min, ref_max, env_id = float(d["ref_min"]), float(d["ref_max"]), str(d["eval_env"])
    model_fields = {k[len("model_") :]: d[k] for k in d.files if k.startswith("model_")}
    dataset = episodes_to_mdp(d)
    algo = make_algo(a.algo, a.seed)
    rng = np.random.default_rng(a.seed)
    probe = rng.integers(0, len(d["rewards"]), 2048)
    out = dict(eval_steps=[], scores=[], q_data=[])
    t_train = 0.0
    for done in range(a.eval_interval, a.updates + 1, a.eval_interval):
        t0 = time.time()
        algo.fit(
            dataset,
            n_steps=a.eval_interval,
            n_steps_per_epoch=a.eval_interval,
            show_progress=False,
            save_interval=10**9,
            logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        )
        t_train += time.time() - t0
        returns = evaluate(algo, env_id, a.eval_episodes, 10_000, model_fields)
        out["eval_steps"].append(done)
        out["scores"].append(float(np.mean(100 * (returns - ref_min) / (ref_max - ref_min))))
        out["q_data"].append(float(np.mean(algo.predict_value(d["observations"][probe], d["actions"][probe]))))
        print(
            f"[peers] {a.algo} seed {a.seed} update {done}: normalised {out['scores'][-1]:.1f}, "
            f"Q(data) {out['q_data'][-1]:.1f}",
            flush=True,
        )
    out["updates_per_second"] = a.updates / t_train
    out["versions"] = dict(d3rlpy=d3rlpy.__version__)
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
