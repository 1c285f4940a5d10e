"""Does another version of ilq_jax.py train the same learners? Both versions, side by side in one process, from the
same seeds, data and frozen models: the protocol batch (3 methods x 2 seeds, behaviour samples drawn 4 updates at a
time) and single-method batches, compared parameter by parameter and metric by metric after --updates updates.

    git show 7d768f1:ilq_jax.py > /tmp/ilq_before.py
    python benchmarks/same_learners.py --before /tmp/ilq_before.py            # this checkout against that file
    python benchmarks/same_learners.py --before /tmp/ilq_before.py --out-md benchmarks/RESULTS.md

Small sizes (hopper's 11/3 dimensions, 32-unit networks, a 3-member ensemble, batch 32, M = 4, N = 2 OOD actions),
random data and slightly perturbed untrained models: the comparison is of the code, not of a trained model.
"""

import argparse
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from results_md import command, git_commit, machine, write_section  # noqa: E402

OBS, ACT, METHODS = 11, 3, ("ilq", "no-imagination", "no-limitation")


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def problem(ilq):
    """The same config, data and models in either version (same keys, same perturbations)."""
    cfg = ilq.ILQConfig.for_task("hopper-medium-replay", OBS, ACT, 1000, batch_size=32, hidden_dim=32, num_behavior_samples=4,
                                 num_ood_actions=2)  # fmt: skip
    k = jax.random.split(jax.random.PRNGKey(0), 8)
    n = 500
    obs = jax.random.normal(k[0], (n, OBS)) + jnp.array([1.2] + [0.0] * (OBS - 1))  # hopper heights: imagined steps go on
    data = ilq.Transitions(obs, jax.random.uniform(k[1], (n, ACT), minval=-1, maxval=1), jax.random.normal(k[2], (n,)),
                           jax.random.normal(k[3], (n, OBS)), (jnp.arange(n) % 7 == 0).astype(jnp.float32))  # fmt: skip
    perturb = lambda p, key, scale: jax.tree_util.tree_map(lambda x: x + scale * jax.random.normal(key, x.shape), p)  # noqa: E731
    dyn = ilq.init_dynamics(OBS, ACT, "hopper", members=3, elites=2, hidden=16)
    beh = ilq.init_behavior(OBS, ACT, 5, 32)
    dyn, beh = dyn.replace(params=perturb(dyn.params, k[4], 0.1)), beh.replace(params=perturb(beh.params, k[5], 0.05))
    if hasattr(ilq, "mish_one_exp"):  # how train() runs the behaviour model since the redesign (the older file's mish)
        beh = beh.replace(mish=ilq.mish_one_exp)
    return cfg, ilq.Frozen(data, dyn, beh)


def run(ilq, methods, seeds, updates: int, chunk: int):
    """(parameters, metrics) of len(methods) x len(seeds) learners after `updates` updates, as train() runs them."""
    cfg, frozen = problem(ilq)
    n = len(methods) * len(seeds)
    keys = jnp.stack([jax.random.split(jax.random.PRNGKey(100 + s), updates) for s in seeds] * len(methods))
    state = jax.vmap(lambda k: ilq.init_train_state(cfg, k))(jnp.stack([jax.random.PRNGKey(s) for s in seeds * len(methods)]))
    assert keys.shape[0] == n
    if hasattr(ilq, "make_learners_update"):
        state, metrics = ilq.make_learners_update(cfg, methods, chunk)(state, frozen, None, keys)
        params = (state.actor.params, state.critic.params, state.critic.target_params, state.alpha.params["log_alpha"])
    else:  # before the redesign: make_update_fn(cfg, batched=True, methods=..., sample_chunk=...)
        state, metrics = ilq.make_update_fn(cfg, batched=True, methods=methods, sample_chunk=chunk)(state, frozen, keys)
        params = (state.actor_params, state.critic_params, state.target_critic_params, state.log_alpha)
    return jax.device_get(params), jax.device_get(metrics)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the other ilq_jax.py")
    p.add_argument("--after", default=os.path.join(ROOT, "ilq_jax.py"))
    p.add_argument("--updates", type=int, default=60)
    p.add_argument("--out-md", default=None)
    p.add_argument("--section", default="same-learners")
    a = p.parse_args(argv)
    before, after = load(a.before, "ilq_before"), load(a.after, "ilq_after")
    rows = []
    for methods, chunk in ((METHODS, 4), (("ilq",), 1), (("ilq",), 4), (("no-limitation",), 4)):
        (p0, m0), (p1, m1) = (run(ilq, methods, (1, 2), a.updates, chunk) for ilq in (before, after))
        d_params = max(
            float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(p1))
        )
        d_metrics = 0.0
        for k in set(m0) | set(m1):  # a metric a method has not (an ablation's y_img - y_lmt) is absent or NaN
            x, y = (np.asarray(m.get(k, np.full_like(np.asarray(m0["losses/q_data"]), np.nan))) for m in (m0, m1))
            assert (np.isfinite(x) == np.isfinite(y)).all(), k
            d_metrics = max(d_metrics, float(np.max(np.abs(x - y)[np.isfinite(x)], initial=0.0)))
        rows.append(f"| {', '.join(methods)} x seeds 1, 2 | {chunk} | {a.updates} | {d_params:.3g} | {d_metrics:.3g} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"Machine: {machine()}. Commit {git_commit()}. Command: `{command()}`. Small sizes (hopper's dimensions, 32-unit "
        "networks, batch 32, M = 4, 2 OOD actions per state), random data and models, the same seeds in both.",
        "",
        "| learners | updates per behaviour chain | updates | max abs difference, any parameter | any metric |",
        "|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    if a.out_md:
        write_section(
            a.out_md, a.section, f"## The same learners: {os.path.basename(a.before)} against this checkout\n\n{text}"
        )
        print(f"[same] wrote the {a.section} section of {a.out_md}")


if __name__ == "__main__":
    main()
