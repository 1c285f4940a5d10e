"""How far do the ILB targets move when the frozen models run in bfloat16 (ilq_jax.py --bf16-models)?

    python benchmarks/bf16_targets.py --dataset ilq-local/walker2d/medium-replay-v0 --out-md benchmarks/RESULTS.md

The dataset's pretrained models are loaded from the model cache (the paper's budget by default; --budget cpu for the
reduced one: they are trained now if missing). For --batches minibatches at the paper's sizes, the targets of one
learner are computed twice with the same keys: with the float32 models and with the same models computing in
bfloat16 (their dtype, as --bf16-models sets it). The learner is the one --updates updates of float32 training make
from --seed (so that its critics are not random). Reported: the imagined state and behaviour actions the models
produce, and y_img, y_lmt, y_ood (Eq. 18-20): mean and max absolute difference, and the mean difference relative to
the spread (std) of the float32 values.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from results_md import command, git_commit, machine, write_section  # noqa: E402

import ilq_jax as ilq  # noqa: E402


def deviations(cfg, state, frozen, frozen_bf16, keys) -> dict:
    """{quantity: (float32 values, bfloat16 values)} over the minibatches of `keys`, the same draws for both."""

    def parts(fr, key):
        idx, k_beh, k_target, _ = ilq.minibatch_draws(cfg, fr, key)  # as ilq_update draws them
        batch = jax.tree_util.tree_map(lambda x: x[idx], fr.data)
        a_beh = ilq.diffusion_sample(fr.behavior, batch.observations, k_beh, cfg.num_behavior_samples)
        t = ilq.ilb_targets(cfg, state, fr, batch, a_beh, k_target)
        s_img = ilq.dynamics_step(fr.dynamics, t.s_ood, t.a_ood, jax.random.split(k_target, 4)[2])[0]  # ilb_targets' key
        return dict(s_img=s_img, a_beh=a_beh, y_img=t.y_img, y_lmt=t.y_lmt, y_ood=t.y_ood)

    run = jax.jit(parts)  # the models as arguments (device arrays), as in training
    out = {}
    for key in keys:
        a, b = run(frozen, key), run(frozen_bf16, key)
        for name in a:
            out.setdefault(name, ([], []))
            out[name][0].append(np.asarray(a[name]).ravel())
            out[name][1].append(np.asarray(b[name]).ravel())
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ilq-local/walker2d/medium-replay-v0")
    p.add_argument("--dataset-path", default=None)
    p.add_argument("--budget", default="paper", choices=["cpu", "paper"], help="pretraining budget of the models")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--updates", type=int, default=500, help="float32 updates that make the learner")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out-md", default=None)
    p.add_argument("--section", default="bf16-targets")
    a = p.parse_args(argv)
    t0 = time.time()
    args = ilq.resolve_args(ilq.Args(env_id=a.dataset, dataset_path=a.dataset_path, budget=a.budget, download=False))
    data, info = ilq.load_dataset(args)
    (dynamics, _, _), (behavior, _, _) = ilq.load_or_pretrain(args, data, info)
    behavior = behavior.replace(mish=ilq.mish_one_exp)  # as train() runs it
    cfg, bf16 = ilq.learner_config(args, info), dict(dtype=jax.numpy.bfloat16)
    frozen = ilq.Frozen(data, dynamics, behavior)
    frozen_bf16 = ilq.Frozen(data, dynamics.replace(**bf16), behavior.replace(**bf16))
    state = ilq.init_train_state(cfg, jax.random.PRNGKey(a.seed))
    state, _ = ilq.make_update_fn(cfg)(state, frozen, jax.random.split(jax.random.PRNGKey(a.seed), a.updates))
    dev = deviations(cfg, state, frozen, frozen_bf16, jax.random.split(jax.random.PRNGKey(a.seed + 1), a.batches))
    lines = [
        f"Machine: {machine()}. Commit {git_commit()}. Command: `{command()}` ({time.time() - t0:.0f} s).",
        "",
        f"Dataset `{info.name}` with its '{a.budget}'-budget models; one learner after {a.updates} float32 updates (seed "
        f"{a.seed}); {a.batches} minibatches of {cfg.batch_size} states (M = {cfg.num_behavior_samples}), the same "
        "draws with the float32 models and with the same models computing in bfloat16 (`--bf16-models`).",
        "",
        "| quantity | float32 std | mean abs difference | max abs difference | mean difference / std |",
        "|---|---|---|---|---|",
    ]
    for name, (x, y) in dev.items():
        d = np.abs(x - y)
        lines.append(f"| {name} | {x.std():.4g} | {d.mean():.3g} | {d.max():.3g} | {d.mean() / max(x.std(), 1e-12):.2%} |")
    text = "\n".join(lines)
    print(text)
    if a.out_md:
        write_section(a.out_md, a.section, "## bfloat16 frozen models: how far the targets move\n\n" + text)
        print(f"[bf16] wrote the {a.section} section of {a.out_md}")


if __name__ == "__main__":
    main()
