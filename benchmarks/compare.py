"""Learning evidence: ILQ against its two ablations, behaviour cloning and d3rlpy's TD3+BC, IQL and CQL, on one
locally generated dataset (benchmarks/make_datasets.py), several seeds, the same update budget.

    python benchmarks/compare.py --quick                    # a few minutes: every method once, tiny budget
    python benchmarks/compare.py                            # ilq-local/hopper/medium-replay-v0, 3 seeds x 20k updates

Every method evaluates the deterministic policy on 10 episodes every --eval-interval updates; the reported score
is the mean of the last 10 evaluations (never the best), then mean +- std over seeds. Runs already finished are
reused (runs/compare__<dataset>__<method>__<seed>/), so an interrupted comparison continues where it stopped.
Outputs: a Markdown table on stdout and in --out-md, and a figure (normalised score; mean Q on dataset actions
against the dataset's best discounted return, the over-optimism diagnostic of the paper's Fig. 10).
The d3rlpy peers run in their own virtualenv (--peers-python, see benchmarks/requirements-peers.txt).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results_md import command, git_commit, machine, write_section  # noqa: E402

import ilq_jax as ilq  # noqa: E402

ILQ_METHODS = {"ILQ": "ilq", "ILQ w/o imagination": "no-imagination", "ILQ w/o limitation": "no-limitation"}
PEERS = ("TD3+BC", "IQL", "CQL")


def run_ilq(a, methods: list, run_dir: str) -> dict:
    """The ILQ variants x --seeds as one program (ilq_jax.py --methods ... --num-seeds N); an interrupted one continues.
    Returns {method: [per seed: eval_steps, scores, q_data, updates_per_second, wall_time_s]}."""
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        s = json.load(open(os.path.join(run_dir, "summary.json")))
    elif os.path.exists(os.path.join(run_dir, "args.json")):
        s = ilq.train(ilq.Args(resume=run_dir))
    else:
        args = ilq.Args(
            env_id=a.dataset,
            seed=1,
            num_seeds=a.seeds,
            methods=",".join(ILQ_METHODS[m] for m in methods),
            run_name=os.path.basename(run_dir),
            total_steps=a.updates,
            eval_interval=a.eval_interval,
            budget=a.pretrain_budget,
            behavior_bank=a.behavior_bank,
        )
        s = ilq.train(args)
    per = dict(eval_steps=s["eval_steps"], updates_per_second=s["updates_per_second"], wall_time_s=s["wall_time_s"])
    return {
        m: [dict(per, scores=x["normalized_scores"], q_data=x["q_data"]) for x in s["methods"][ILQ_METHODS[m]]["seeds"]]
        for m in methods
    }


def run_bc(a, seed: int, data: ilq.Transitions, info: ilq.DatasetInfo) -> dict:
    """Behaviour cloning: ILQ's actor network regressing tanh(mean) onto the dataset actions (MSE)."""
    actor = ilq.Actor(info.act_dim)
    key = jax.random.PRNGKey(seed)
    params = actor.init(key, data.observations[:1])
    opt = optax.adam(3e-4)
    opt_state = opt.init(params)

    def step(carry, k):
        params, opt_state = carry
        idx = jax.random.randint(k, (256,), 0, data.rewards.shape[0])
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((ilq.deterministic_action(actor, p, data.observations[idx]) - data.actions[idx]) ** 2)
        )(params)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    many = jax.jit(lambda c, keys: jax.lax.scan(step, c, keys))
    policy = jax.jit(partial(ilq.deterministic_action, actor))
    envs = ilq.make_env(info, 10)
    out = dict(eval_steps=[], scores=[], q_data=[])
    t_train, carry = 0.0, (params, opt_state)
    for done in range(a.eval_interval, a.updates + 1, a.eval_interval):
        t0 = time.time()
        carry, _ = many(carry, jax.random.split(jax.random.fold_in(key, done), a.eval_interval))
        jax.block_until_ready(carry)
        t_train += time.time() - t0
        out["eval_steps"].append(done)
        out["scores"].append(float(info.normalize(ilq.evaluate(envs, policy, carry[0], 10_000)).mean()))
        print(f"[compare] BC seed {seed} update {done}: normalised {out['scores'][-1]:.1f}", flush=True)
    envs.close()
    out["updates_per_second"] = a.updates / t_train
    return out


def run_peer(a, algo: str, seed: int, run_dir: str, data_npz: str) -> dict:
    out_json = os.path.join(run_dir, "peer.json")
    cmd = [
        a.peers_python,
        os.path.join(ROOT, "benchmarks", "peers_learn.py"),
        "--algo",
        algo,
        "--data",
        data_npz,
        "--seed",
        str(seed),
        "--updates",
        str(a.updates),
        "--eval-interval",
        str(a.eval_interval),
        "--out",
        out_json,
    ]
    subprocess.run(cmd, check=True)
    return json.load(open(out_json))


def best_discounted_return(dataset_id: str, gamma: float) -> float:
    """max over dataset episodes of sum_t gamma^t r_t: what Q(s_0, a_0) could at most be on this data."""
    import minari

    best = -np.inf
    for ep in minari.load_dataset(dataset_id).iterate_episodes():
        best = max(best, float(np.sum(ep.rewards * gamma ** np.arange(len(ep.rewards)))))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ilq-local/hopper/medium-replay-v0")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--updates", type=int, default=20_000)
    p.add_argument("--eval-interval", type=int, default=1_000)
    p.add_argument("--pretrain-budget", choices=["cpu", "paper"], default="cpu")
    p.add_argument("--behavior-bank", action="store_true", help="ILQ variants use --behavior-bank (faster on CPU)")
    p.add_argument("--methods", default="ILQ,ILQ w/o imagination,ILQ w/o limitation,BC,TD3+BC,IQL,CQL")
    p.add_argument("--peers-python", default=os.path.join(ROOT, ".venv-peers", "bin", "python"))
    p.add_argument("--out-md", default=None, help="also write the table and figure link to this Markdown file")
    p.add_argument("--figure", default=None, help="default benchmarks/figures/compare_<dataset>_<updates>.png")
    p.add_argument("--quick", action="store_true", help="1 seed, 1 000 updates, evaluation every 250")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.updates, a.eval_interval = 1, 1_000, 250
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in list(ILQ_METHODS) + ["BC"] + list(PEERS)]
    if unknown:
        sys.exit(f"error: unknown methods {unknown}")
    if any(m in PEERS for m in methods) and not os.path.exists(a.peers_python):
        print(
            f"[compare] no peers virtualenv at {a.peers_python}: skipping {', '.join(PEERS)} (see "
            f"benchmarks/README.md to create it)",
            flush=True,
        )
        methods = [m for m in methods if m not in PEERS]

    data, info = ilq.load_dataset(ilq.Args(env_id=a.dataset, download=False))
    print(ilq.describe_dataset(data, info), flush=True)
    data_npz = os.path.join("runs", f"compare__{ilq.slug(a.dataset)}__data.npz")
    os.makedirs(os.path.dirname(data_npz), exist_ok=True)
    model_fields = {}  # the evaluation robot's restored -v2 masses, for the peers' own (Gymnasium) env
    if "-v2 masses" in info.eval_env.note:
        env = info.eval_env.make()
        model_fields = {f"model_{k}": np.array(getattr(env.unwrapped.model, k)) for k in ilq.V2_MASS_FIELDS}
        env.close()
    np.savez(
        data_npz,
        **{k: np.asarray(v) for k, v in data._asdict().items()},
        **model_fields,
        eval_env=info.eval_env.id,
        ref_min=info.ref_min,
        ref_max=info.ref_max,
    )
    q_ref = best_discounted_return(a.dataset, 0.99)
    tag = f"{'quick__' if a.quick else ''}{a.updates}"

    results, ilq_methods = {}, [m for m in methods if m in ILQ_METHODS]
    if ilq_methods:  # one program: every (variant, seed) learner in one jitted scan
        print(f"[compare] {', '.join(ilq_methods)} x {a.seeds} seeds in one program: {a.updates} updates", flush=True)
        results.update(run_ilq(a, ilq_methods, os.path.join("runs", f"compare__{ilq.slug(a.dataset)}__{tag}__ILQ-variants")))
    for method in [m for m in methods if m not in ILQ_METHODS]:
        for seed in range(1, a.seeds + 1):
            run_dir = os.path.join("runs", f"compare__{ilq.slug(a.dataset)}__{tag}__{ilq.slug(method)}__{seed}")
            done_file = os.path.join(run_dir, "compare.json")
            if os.path.exists(done_file):
                results.setdefault(method, []).append(json.load(open(done_file)))
                continue
            print(f"[compare] {method}, seed {seed}: {a.updates} updates", flush=True)
            t0 = time.time()
            if method == "BC":
                os.makedirs(run_dir, exist_ok=True)
                r = run_bc(a, seed, data, info)
            else:
                os.makedirs(run_dir, exist_ok=True)
                r = run_peer(a, method, seed, run_dir, data_npz)
            r["wall_time_s"] = time.time() - t0
            with open(done_file, "w") as f:
                json.dump(r, f)
            results.setdefault(method, []).append(r)

    rows = [
        "| method | seeds | normalised score (last-10-eval mean ± std over seeds) | final mean Q(data) | "
        "updates/s | wall time per run |",
        "|---|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        last = [np.mean(r["scores"][-10:]) for r in runs]
        qs = [r["q_data"][-1] for r in runs if r.get("q_data")]
        rows.append(
            f"| {method} | {len(runs)} | {np.mean(last):.1f} ± {np.std(last):.1f} | "
            + (f"{np.mean(qs):.1f}" if qs else "–")
            + f" | {np.mean([r['updates_per_second'] for r in runs]):.1f} | "
            f"{np.mean([r['wall_time_s'] for r in runs]) / 60:.1f} min"
            + (" (all ILQ variants and seeds in one program)" if method in ILQ_METHODS else "")
            + " |"
        )
    ds_norm = info.normalize(info.episode_returns)
    versions = ilq.package_versions()
    total_min = sum(r["wall_time_s"] for runs in results.values() for r in runs) / 60
    header = (
        f"Dataset `{a.dataset}` ({info.source}); {len(info.episode_returns)} episodes, {len(data.rewards)} "
        f"transitions; scores normalised with D4RL's reference returns {info.ref_min:g} (random) and "
        f"{info.ref_max:g} (expert); dataset mean normalised return {ds_norm.mean():.1f}; best discounted "
        f"return in the data {q_ref:.1f}. {a.updates} updates per run, evaluation every {a.eval_interval} "
        f"updates on 10 episodes; ILQ models pretrained with the '{a.pretrain_budget}' budget"
        f"{'; ILQ variants with --behavior-bank' if a.behavior_bank else ''}.\n\n"
        f"Machine: {machine()}. Commit {git_commit()}. "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("python", "jax", "flax", "gymnasium"))
        + f". Command: `{command()}`; the runs took {total_min:.0f} min in all (finished runs are reused)."
    )
    table = header + "\n\n" + "\n".join(rows)
    print(table)

    fig_path = a.figure or os.path.join(ROOT, "benchmarks", "figures", f"compare_{ilq.slug(a.dataset)}_{tag}.png")
    plot(results, q_ref, a.dataset, fig_path)
    print(f"[compare] figure: {fig_path}")
    if a.out_md:  # one section per dataset and budget, rewritten in place by a later run
        figure = os.path.relpath(fig_path, os.path.dirname(os.path.abspath(a.out_md)))
        write_section(
            a.out_md,
            f"learning-{ilq.slug(a.dataset)}-{tag}",
            f"## Learning: `{a.dataset}`\n\n{table}\n\n![learning curves]({figure})",
        )


def plot(results: dict, q_ref: float, dataset: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_q) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, runs in results.items():
        steps = np.asarray(runs[0]["eval_steps"])
        scores = np.asarray([r["scores"] for r in runs])
        (line,) = ax_s.plot(steps, scores.mean(0), label=method)
        ax_s.fill_between(
            steps, scores.mean(0) - scores.std(0), scores.mean(0) + scores.std(0), color=line.get_color(), alpha=0.15
        )
        if runs[0].get("q_data"):
            ax_q.plot(steps, np.mean([r["q_data"] for r in runs], 0), label=method, color=line.get_color())
    ax_q.axhline(q_ref, color="k", ls="--", label="best discounted return in data")
    ax_s.set(xlabel="updates", ylabel="normalised score", title=f"{dataset}: evaluation (mean ± std over seeds)")
    ax_q.set(xlabel="updates", ylabel="mean Q on dataset actions", title="over-optimism check (paper Fig. 10)")
    ax_q.set_yscale("symlog")
    ax_s.legend(fontsize=8)
    ax_q.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
