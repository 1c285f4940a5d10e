"""The paper's protocol on one dataset in one command: ILQ, ILQ w/o imagination and ILQ w/o limitation (Sec. 5.4),
5 seeds each, as one program (`ilq_jax.py --methods ilq,no-imagination,no-limitation --num-seeds 5`: 15 learners in
one jitted scan), paper-budget pretraining (or the models already in --model-dir), 10^6 updates per learner or as many
as the time box allows, then a table and the curves.

    python benchmarks/protocol.py --dataset ilq-local/hopper/medium-replay-v0 --minutes 8 --out OUT
    python benchmarks/protocol.py --dataset walker2d-medium-replay --dataset-path FILE.hdf5 --minutes 8 --out OUT
    python benchmarks/protocol.py --rehearse --out OUT      # CPU rehearsal (CI): tiny sizes and budget

The run is ilq_jax.py's own (--time-box-min ends it at the first evaluation after the box, as a finished run that
records how far it got); evaluation every 5 000 updates as in the paper, or often enough for 12 evaluations when the
budget is smaller. Score: per seed the mean of the last 10 evaluations (never the best), then mean +- std over seeds,
beside the dataset's own mean and the paper's Table 1 number where the task has one. Writes into OUT: protocol.md,
curves.png, summary.json (the run's), and with --out-md a section of that Markdown file.
"""

import argparse
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from paper_numbers import PAPER  # noqa: E402
from results_md import command, git_commit, machine, write_section  # noqa: E402

import ilq_jax as ilq  # noqa: E402

METHODS = ("ilq", "no-imagination", "no-limitation")
NAMES = {"ilq": "ILQ", "no-imagination": "ILQ w/o imagination", "no-limitation": "ILQ w/o limitation"}
REHEARSAL = dict(random_dataset_steps=3000, total_steps=40, updates_per_call=10, eval_interval=20, eval_episodes=2,
                 dynamics_epochs=1, diffusion_steps=100, hidden_dim=32, dynamics_hidden=32, batch_size=32,
                 num_behavior_samples=3, sample_chunk=2)  # fmt: skip


def protocol_args(a, run_name: str) -> ilq.Args:
    if a.rehearse:
        return ilq.Args(env_id=a.dataset, methods=",".join(METHODS), num_seeds=a.seeds, run_name=run_name,
                        model_dir=a.model_dir, time_box_min=a.minutes, **REHEARSAL)  # fmt: skip
    eval_interval = min(5_000, max(1, a.updates // 12))
    return ilq.Args(
        env_id=a.dataset,
        dataset_path=a.dataset_path,
        methods=",".join(METHODS),
        num_seeds=a.seeds,
        budget="paper",
        total_steps=a.updates,
        eval_interval=eval_interval,
        checkpoint_interval=max(eval_interval, a.updates // 4 // eval_interval * eval_interval),
        updates_per_call=min(1_000, eval_interval),
        run_name=run_name,
        model_dir=a.model_dir,
        time_box_min=a.minutes,
        behavior_bank=a.behavior_bank,
    )


def table(summary: dict, task, wall_s: float, rehearse: bool, out_md_command: str) -> str:
    methods, ds = summary["methods"], summary["dataset"]
    paper = "{:.1f} ± {:.1f}".format(*PAPER[task]) if task in PAPER else None
    local = "LOCALLY MADE" in ds["source"] or ds["name"].startswith(ilq.LOCAL_NAMESPACE)
    lines = ["**Rehearsal on CPU (tiny sizes and budget): proves the command, measures nothing.**", ""] if rehearse else []
    reached = f"{summary['updates']} of {summary['args']['total_steps']} updates per learner"
    reached += " (the time box ended it)" if summary["ended_by_time_box"] else ""
    lines += [
        f"Machine: {machine()}. Commit {git_commit()}. Command: `{out_md_command}` ({wall_s:.0f} s in all, "
        f"pretraining included; {summary['updates_per_second']:.0f} updates/s per learner, {summary['learners']} learners "
        "in one program).",
        "",
        f"Dataset `{ds['name']}` ({ds['source']}); {reached}; {len(summary['methods'][METHODS[0]]['seeds'])} seeds per "
        f"method; evaluation every {summary['args']['eval_interval']} updates, {summary['args']['eval_episodes']} "
        f"episodes, deterministic policy, on {summary['evaluation']['env']}. Score: per seed the mean of the last 10 "
        "evaluations (never the best), then mean ± std over seeds. Dataset mean normalised return: "
        + ("n/a" if summary["dataset_mean_normalized_return"] is None else f"{summary['dataset_mean_normalized_return']:.1f}")
        + ".",
        "",
        "| method | final normalised score | per seed | paper (Table 1, ILQ, D4RL data, 10^6 updates) |",
        "|---|---|---|---|",
    ]
    for m in METHODS:
        s = methods[m]
        score = (
            "-"
            if s["final_normalized_score"] is None
            else f"{s['final_normalized_score']:.1f} ± {s['final_normalized_score_std']:.1f}"
        )
        per_seed = ", ".join(
            "-" if x["final_normalized_score"] is None else f"{x['final_normalized_score']:.1f}" for x in s["seeds"]
        )
        ref = (paper or "no row") if m == "ilq" else ""
        if m == "ilq" and paper and local:
            ref += " (other data: not comparable)"
        lines.append(f"| {NAMES[m]} | {score} | {per_seed} | {ref} |")
    finals = {m: methods[m]["final_normalized_score"] for m in METHODS}
    if all(v is not None for v in finals.values()):
        spread = max(methods[m]["final_normalized_score_std"] for m in METHODS)
        gap = finals["ilq"] - max(finals["no-imagination"], finals["no-limitation"])
        verdict = "ILQ is above both ablations" if gap > 0 else "ILQ is not above both ablations"
        verdict += (
            f" by {gap:.1f}, more than the largest std over seeds ({spread:.1f})"
            if abs(gap) > spread
            else f" ({gap:+.1f}), within the spread over seeds ({spread:.1f}): no ranking"
        )
        if summary["updates"] < 1_000_000:
            verdict += f"; at {summary['updates']} updates, not the paper's 10^6, this is no test of the paper's claim"
        lines += ["", f"Reading: {verdict}."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ilq-local/hopper/medium-replay-v0", help="a D4RL name or a Minari id")
    p.add_argument("--dataset-path", default=None, help="D4RL-layout HDF5 file for a D4RL name")
    p.add_argument("--minutes", type=float, default=8.0, help="time box from the start, pretraining included")
    p.add_argument("--updates", type=int, default=1_000_000, help="updates per learner when they fit in the box")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--behavior-bank", action="store_true", help="behaviour samples drawn once (not the paper)")
    p.add_argument("--model-dir", default=os.path.expanduser("~/.cache/ilq-jax/models"), help="pretrained-model cache")
    p.add_argument("--out", required=True, help="folder for protocol.md, curves.png, summary.json and the run")
    p.add_argument("--out-md", default=None, help="also write the table as a section of this Markdown file")
    p.add_argument("--section", default=None, help="section name (default: protocol-<dataset>)")
    p.add_argument("--rehearse", action="store_true", help="tiny sizes and budget on a generated dataset (CI)")
    a = p.parse_args(argv)
    if a.rehearse:
        a.dataset, a.dataset_path, a.seeds = "ilq-local/hopper/random-v0", None, 2
    a.model_dir = os.path.abspath(os.path.expanduser(a.model_dir))  # the run starts inside --out
    a.dataset_path = a.dataset_path and os.path.abspath(a.dataset_path)
    t0 = time.time()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    run_dir = os.path.join(out, "runs", "protocol")  # ilq_jax.py's run folder runs/<run-name>, under --out
    if os.path.exists(run_dir):
        sys.exit(f"error: {run_dir} exists: pick another --out (or delete it)")
    cwd = os.getcwd()
    try:
        os.chdir(out)
        summary = ilq.train(protocol_args(a, "protocol"))
    except ilq.ILQError as e:
        sys.exit(f"error: {e}")
    finally:
        os.chdir(cwd)
    task = summary["dataset"]["name"] if ilq.parse_d4rl_name(summary["dataset"]["name"]) else None
    task = ilq.parse_d4rl_name(task)[0] if task else None
    text = table(summary, task, time.time() - t0, a.rehearse, command())
    print(text)
    open(os.path.join(out, "protocol.md"), "w").write(text + "\n")
    shutil.copy(os.path.join(run_dir, "summary.json"), os.path.join(out, "summary.json"))
    ilq.plot_curves(summary, os.path.join(out, "curves.png"))  # the run's own figure (also in the run folder)
    if a.out_md:
        section = a.section or "protocol-" + ilq.slug(a.dataset)
        write_section(a.out_md, section, text + f"\n\n![curves](figures/{section}.png)")
        os.makedirs(os.path.join(os.path.dirname(os.path.abspath(a.out_md)), "figures"), exist_ok=True)
        shutil.copy(
            os.path.join(out, "curves.png"),
            os.path.join(os.path.dirname(os.path.abspath(a.out_md)), "figures", f"{section}.png"),
        )
    print(f"[protocol] done in {time.time() - t0:.0f}s: {out}/protocol.md, curves.png, summary.json")


if __name__ == "__main__":
    main()
