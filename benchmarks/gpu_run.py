"""The body of benchmarks/gpu.sh (run that, not this): the speed table, then the largest learning run that fits.

1. Speed (benchmarks/speed.py): updates/s of train()'s compiled update for 1, 10, 100 and 1000 updates per host
   call, fresh behaviour samples (the paper) and --behavior-bank, and 1 and 8 vmapped seeds.
2. Learning: ILQ, ILQ w/o imagination and ILQ w/o limitation, --num-seeds 5 each, three processes sharing the GPU,
   on the bundle's dataset with its pretrained models. The update budget is sized from the measured speed so that
   everything ends inside --deadline-s; a run still going at the deadline is stopped with Ctrl-C (it saves a
   checkpoint) and reported with the evaluations it reached, marked as such.
Writes speed.md, speed.json, learn.md, curves.png and runs.tar.gz (logs, summaries, TensorBoard files; no
checkpoints) into --out.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import speed  # noqa: E402
from results_md import git_commit, machine  # noqa: E402

METHODS = {"ILQ": [], "ILQ w/o imagination": ["--no-imagination"], "ILQ w/o limitation": ["--no-limitation"]}


def slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")


def learning_budget(by_seeds: dict, seconds: float, learners: int, per_call: int) -> int:
    """Updates per learner that fit in `seconds` when `learners` share the GPU, from the measured throughput of
    the largest vmapped batch (the GPU is assumed saturated: learners split its updates/s)."""
    fresh = by_seeds[False]
    throughput = fresh[max(fresh)]["updates_per_s"]
    return max(per_call, int(throughput / learners * seconds) // per_call * per_call)


def progress_of(run_dir: str) -> tuple[dict, bool]:
    """A finished run's summary, or the evaluations a stopped run reached (from its last checkpoint)."""
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return json.load(open(os.path.join(run_dir, "summary.json"))), True
    if not os.path.exists(os.path.join(run_dir, "checkpoint.json")):
        return {}, False
    p = json.load(open(os.path.join(run_dir, "checkpoint.json")))
    seeds = json.load(open(os.path.join(run_dir, "args.json")))
    seeds = list(range(seeds["seed"], seeds["seed"] + seeds["num_seeds"]))
    sys.path.insert(0, ROOT)
    import ilq_jax

    return dict(
        **ilq_jax.summarize(p, seeds),
        eval_steps=p["eval_steps"],
        wall_time_s=p["wall_time_s"],
        updates_per_second=p["updates"] / max(p["train_time_s"], 1e-9),
    ), False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--deadline-s", type=float, default=480.0, help="wall time of this script, all included")
    p.add_argument("--seeds", type=int, default=5, help="vmapped seeds per learning run")
    p.add_argument("--rehearse", action="store_true", help="tiny budget on CPU (CI): proves the script, measures nothing")
    a = p.parse_args(argv)
    t0 = time.time()
    bundle = json.load(open(os.path.join(a.bundle, "bundle.json")))
    out = os.path.abspath(a.out)

    common = [
        "--peers-python",
        "/nonexistent",
        "--skip-parts",
        "--section",
        "speed-gpu",
        "--out-md",
        os.path.join(out, "speed.md"),
        "--json",
        os.path.join(out, "speed.json"),
    ]
    if a.rehearse:
        sp = speed.main(["--quick", "--tiny", *common])
        per_call, total, episodes, seeds = 10, 20, 1, 2
    else:
        sp = speed.main(["--repeats", "3", "--calls", "1,10,100,1000", "--seeds", "1,8", "--seed-calls", "1000", *common])
        per_call, episodes, seeds = 1000, 5, a.seeds
        # what is left, less start-up (imports, data, compiles) and ten evaluations of 5 seeds x 5 episodes
        left = a.deadline_s - (time.time() - t0) - 75 - 60
        total = learning_budget(sp["by_seeds"], left, len(METHODS) * seeds, per_call)
    speed_s = time.time() - t0
    print(
        f"[gpu] speed table done in {speed_s:.0f}s; learning: {total} updates x {seeds} seeds x {len(METHODS)} "
        f"methods on {bundle['dataset']}",
        flush=True,
    )

    work = tempfile.mkdtemp(prefix="ilq-gpu-")
    procs = {}
    for method, flags in METHODS.items():
        cmd = [
            sys.executable,
            os.path.join(ROOT, "ilq_jax.py"),
            "--env-id",
            bundle["dataset"],
            *bundle["args"],
            "--model-dir",
            os.path.join(a.bundle, "models"),
            "--num-seeds",
            str(seeds),
            "--total-steps",
            str(total),
            "--eval-interval",
            str(max(1, total // 10)),
            "--eval-episodes",
            str(episodes),
            "--updates-per-call",
            str(per_call),
            "--run-name",
            slug(method),
            *flags,
        ]
        log = open(os.path.join(work, f"{slug(method)}.log"), "w")
        procs[method] = (subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT), log, time.time())
    wall = {}
    for method, (proc, log, started) in procs.items():
        try:
            proc.wait(timeout=max(1.0, a.deadline_s - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # the run saves a checkpoint and stops after its current call
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        wall[method] = time.time() - started
        log.close()
        print(f"[gpu] {method}: exit code {proc.returncode} after {wall[method]:.0f}s", flush=True)

    results = {m: progress_of(os.path.join(work, "runs", slug(m))) for m in METHODS}
    lines = [
        f"Machine: {machine()}. Commit {git_commit()}. Command: `bash benchmarks/gpu.sh OUTDIR"
        f"{' --rehearse' if a.rehearse else ''}` ({time.time() - t0:.0f} s in all, speed table {speed_s:.0f} s).",
        "" if not a.rehearse else "\n**Rehearsal on CPU (tiny budget): proves the command, measures nothing.**\n",
        f"Dataset `{bundle['dataset']}` with the bundle's pretrained models ({' '.join(bundle['args'])}); "
        f"{total} updates per seed, {seeds} vmapped seeds per method (`--num-seeds {seeds}`), the three methods "
        f"as three processes sharing the GPU; evaluation every {max(1, total // 10)} updates, {episodes} "
        f"episodes, deterministic policy. Score: per seed the mean of the last 10 evaluations (never the best), "
        f"then mean ± std over seeds.",
        "",
        "| method | final normalised score | per seed | evaluations | updates/s per seed | wall s | finished |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, (r, finished) in results.items():
        if not r:
            lines.append(f"| {method} | no evaluation reached | | | | {wall[method]:.0f} | no |")
            continue
        per_seed = ", ".join(
            "-" if s["final_normalized_score"] is None else f"{s['final_normalized_score']:.1f}" for s in r["seeds"]
        )
        score = (
            "-"
            if r["final_normalized_score"] is None
            else f"{r['final_normalized_score']:.1f} ± {r['final_normalized_score_std']:.1f}"
        )
        lines.append(
            f"| {method} | {score} | {per_seed} | {len(r['eval_steps'])} | {r['updates_per_second']:.0f} | "
            f"{wall[method]:.0f} | {'yes' if finished else 'no: stopped at the deadline'} |"
        )
    text = "\n".join(lines)
    print(text)
    open(os.path.join(out, "learn.md"), "w").write(text + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_q) = plt.subplots(1, 2, figsize=(11, 4))
    for method, (r, _) in results.items():
        if not r or not r["eval_steps"]:
            continue
        scores = np.array([[np.nan if v is None else v for v in s["normalized_scores"]] for s in r["seeds"]], float)
        q = np.array([s["q_data"] for s in r["seeds"]], float)
        steps = r["eval_steps"]
        (line,) = ax_s.plot(steps, scores.mean(0), label=method)
        ax_s.fill_between(
            steps, scores.mean(0) - scores.std(0), scores.mean(0) + scores.std(0), alpha=0.2, color=line.get_color()
        )
        ax_q.plot(steps, q.mean(0), label=method, color=line.get_color())
    ax_s.set(xlabel="updates", ylabel="normalised score (mean ± std over seeds)", title=bundle["dataset"])
    ax_q.set(xlabel="updates", ylabel="mean Q on dataset actions", title="over-optimism check")
    ax_s.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)

    with tarfile.open(os.path.join(out, "runs.tar.gz"), "w:gz") as tar:
        tar.add(work, arcname="gpu-runs", filter=lambda ti: None if ti.name.endswith(".msgpack") else ti)
    print(f"[gpu] done in {time.time() - t0:.0f}s; wrote {sorted(os.listdir(out))} to {out}")


if __name__ == "__main__":
    main()
