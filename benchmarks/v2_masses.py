"""Does restoring D4RL's -v2 masses change what a policy scores? Fixed policies evaluated on Gymnasium's -v4 as shipped
(today's exact capsule masses) and on the evaluation env of D4RL's locomotion names in ilq_jax.py (-v4 with the masses,
inertias and inertial frames MuJoCo < 2.1.2 compiled, as on mujoco-py where D4RL's data were recorded), episode i of
both starting from the same seed --seed + i:

    (a) a uniformly random policy (the same action stream on both robots)
    (b) with --policy PATH, a saved SAC policy (benchmarks/make_datasets.py's <robot>_medium-sac-policy.msgpack and
        its .json), acting deterministically with tanh(mean) as ilq_jax.py evaluates

Outputs mean +- std over episodes of the return and of D4RL's normalised score (ilq_jax.D4RL_REF_SCORES), as a
Markdown table on stdout and, with --out-md, as the section --section of that file. Commands:

    python benchmarks/v2_masses.py --robot hopper                      # random policy only, 20 episodes
    python benchmarks/v2_masses.py --policy hopper_medium-sac-policy.msgpack \\
        --out-md benchmarks/RESULTS.md --section v2-masses
"""

import argparse
import os
import sys
import time
import warnings
from functools import partial

import gymnasium as gym
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from results_md import command, git_commit, machine, write_section  # noqa: E402

import ilq_jax as ilq  # noqa: E402
from benchmarks import make_datasets  # noqa: E402


def shipped_env(env_id: str) -> gym.Env:
    """gym.make(env_id) as Gymnasium ships it (what --eval-env-id gives)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is out of date.*")
        return gym.make(env_id)


def random_policy(act_dim: int, seed: int):
    """policy(params, obs) -> uniform actions in [-1, 1]; a fresh one per robot gives both the same action stream."""
    rng = np.random.default_rng(seed)
    return lambda params, obs: rng.uniform(-1.0, 1.0, (obs.shape[0], act_dim))


def returns_on(make, policy, params, episodes: int, seed: int) -> np.ndarray:
    envs = gym.vector.SyncVectorEnv([make for _ in range(episodes)])
    try:
        return ilq.evaluate(envs, policy, params, seed)  # env i starts from seed + i
    finally:
        envs.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--robot", choices=sorted(ilq.D4RL_LOCOMOTION_V4), default=None, help="default: the policy's, else hopper")
    p.add_argument("--policy", default=None, help="a policy written by benchmarks/make_datasets.py (.msgpack, .json beside)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per policy and robot (fewer than 20: a smoke run)")
    p.add_argument("--seed", type=int, default=0, help="episode i starts from seed + i on both robots")
    p.add_argument("--out-md", default=None, help="Markdown file whose section --section is (re)written")
    p.add_argument("--section", default="v2-masses", help="name of the section to write")
    a = p.parse_args(argv)
    t_start = time.time()

    policies = {}  # name -> (policy(params, obs), params, description)
    if a.policy:
        actor, params, side = make_datasets.load_policy(a.policy)
        by_env = {v: k for k, v in ilq.D4RL_LOCOMOTION_V4.items()}
        robot = by_env.get(side.get("env"))
        if robot is None or (a.robot and a.robot != robot):
            p.error(f"{a.policy} was trained on {side.get('env')}, not on {ilq.D4RL_LOCOMOTION_V4.get(a.robot, a.robot)}")
        a.robot = robot
        trained = side.get("env_note") or (  # make_datasets.py trains on ilq.make_d4rl_locomotion: -v2 masses since then
            f"{side.get('env')}, masses not recorded (make_datasets.py trained on the shipped masses before ilq_jax.py "
            "restored the -v2 ones, on the -v2 masses after)"
        )
        what = f"`{os.path.basename(a.policy)}`: {side.get('what', '?')}; trained on {trained}"
        policies["SAC, deterministic"] = (jax.jit(partial(ilq.deterministic_action, actor)), params, what)
    a.robot = a.robot or "hopper"
    env_id, (obs_dim, act_dim) = ilq.D4RL_LOCOMOTION_V4[a.robot], ilq.D4RL_SIZES[a.robot]
    if a.policy and (side["obs_dim"], side["act_dim"]) != (obs_dim, act_dim):
        p.error(f"{a.policy} has observation/action sizes {side['obs_dim']}/{side['act_dim']}, {a.robot} {obs_dim}/{act_dim}")
    policies = {"uniform random": (None, None, "actions uniform in [-1, 1]"), **policies}
    eval_env = ilq.d4rl_eval_env(f"{a.robot}-medium")
    robots = {f"{env_id} as shipped": partial(shipped_env, env_id), f"{env_id}, -v2 masses restored": eval_env.make}
    refs = ilq.D4RL_REF_SCORES[a.robot]
    score = lambda r: 100.0 * (r - refs[0]) / (refs[1] - refs[0])

    rows = ["| policy | robot | episodes | return, mean ± std | normalised score, mean ± std |", "|---|---|---|---|---|"]
    for name, (policy, params, _) in policies.items():
        means = {}
        for robot, make in robots.items():
            pol = policy or random_policy(act_dim, a.seed)
            r = returns_on(make, pol, params, a.episodes, a.seed)
            means[robot], n = (r.mean(), r.std() / np.sqrt(len(r))), score(r)
            rows.append(f"| {name} | {robot} | {len(r)} | {r.mean():.1f} ± {r.std():.1f} | {n.mean():.1f} ± {n.std():.1f} |")
            print(f"[v2-masses] {name} on {robot}: return {r.mean():.1f} ± {r.std():.1f}", flush=True)
        (m0, s0), (m1, s1) = means.values()
        diff, se = m1 - m0, np.hypot(s0, s1)
        rows.append(
            f"| {name} | difference (restored − shipped) | | {diff:+.1f} ± {se:.1f} (s.e.) | "
            f"{100 * diff / (refs[1] - refs[0]):+.1f} ± {100 * se / (refs[1] - refs[0]):.1f} (s.e.) |"
        )

    versions = ilq.package_versions()
    lines = []
    if a.episodes < 20:
        lines += [f"**Smoke run ({a.episodes} episodes per row, fewer than 20): not a measurement.**", ""]
    lines += [
        f"Robot {a.robot}: `{env_id}` as Gymnasium ships it (MuJoCo {versions.get('mujoco', '?')}: exact capsule masses) "
        f"against ilq_jax.py's evaluation env of D4RL's {a.robot} data ({eval_env.note}). Episode i of every row starts "
        f"from seed {a.seed} + i; the random policy draws the same action stream on both robots. Scores normalised with "
        f"D4RL's reference returns {refs[0]:g} (random) and {refs[1]:g} (expert). Policies: "
        + "; ".join(f"{name}: {what}" for name, (_, _, what) in policies.items())
        + ".",
        "",
        f"Machine: {machine()}. Commit {git_commit()}. "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("python", "jax", "gymnasium", "mujoco"))
        + f". Command: `{command()}` ({time.time() - t_start:.0f} s).",
        "",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    if a.out_md:
        write_section(a.out_md, a.section, f"## -v2 masses: {a.robot}\n\n{text}")
        print(f"[v2-masses] wrote section '{a.section}' of {a.out_md}")


if __name__ == "__main__":
    main()
