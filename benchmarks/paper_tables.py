"""The paper's Tables 1 and 2 in one command: every dataset of Liu et al. (IJCAI 2025) Tables 1-2, ILQ (with
--ablations also its two ablations, Sec. 5.4) x 5 seeds at the paper's budget, one job per dataset running ilq_jax.py's
own training, on this machine (one job per visible GPU) or on a SLURM cluster, through submitit.

    python benchmarks/paper_tables.py --tables 1,2 --out OUT              # here: one job per visible GPU (one on a CPU)
    python benchmarks/paper_tables.py --tables 1 --ablations --executor slurm --partition gpu --out OUT
    python benchmarks/paper_tables.py --tasks ilq-local/hopper/random-v0 --num-seeds 2 --out OUT -- --total-steps 40

Flags after `--` go to every `ilq_jax.py` run. A dataset's run folder is OUT/runs/<dataset>, its log OUT/logs/<dataset>.log,
the pretrained models OUT/models. The same command again continues: a finished dataset is skipped, a stopped or
pre-empted one resumed (--resume), a failed one retried once (then reported with its log's last lines); while one
invocation runs, another only reports. After every finished job: OUT/table1.md and OUT/table2.md (the paper's datasets
beside its numbers), OUT/table_other.md (other data, e.g. ilq-local/...: never compared with the paper), OUT/tables.json;
each with the interquartile mean over datasets x seeds and stratified-bootstrap 95 % intervals from rliable, with
--ablations the probability that ILQ improves on each ablation, a performance profile (<table>_profile.png) and the
learning curves (<table>_curves.png).
"""

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import submitit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from paper_numbers import PAPER  # noqa: E402

import ilq_jax as ilq  # noqa: E402

TABLE_1 = tuple(
    f"{r}-{k}" for k in ("random", "medium", "medium-replay", "medium-expert") for r in ("halfcheetah", "hopper", "walker2d")
)
MAZE2D = tuple(f"maze2d-{m}{d}" for m in ("umaze", "medium", "large") for d in ("", "-dense"))
ADROIT = ("pen-human", "pen-cloned")
TABLES = {  # --tables N: its file, title, datasets, and the totals the paper prints (label, datasets, the paper's total)
    "1": dict(file="table1", title="Table 1: MuJoCo locomotion, D4RL -v2", tasks=TABLE_1,
              totals=(("total (12 datasets)", TABLE_1, 920.4), ("total without random (9 datasets)", TABLE_1[3:], 835.5))),
    "2": dict(file="table2", title="Table 2: Maze2D (D4RL -v1) and Adroit (D4RL -v0)", tasks=MAZE2D + ADROIT,
              totals=(("Maze2D total", MAZE2D, 860.8), ("Adroit total", ADROIT, 162.9))),
    "other": dict(file="table_other", title="Other datasets: not the paper's data, never compared with its numbers",
                  tasks=(), totals=()),
}  # fmt: skip
PAPER_VERSION = {"maze2d": "v1", "pen": "v0"}  # the paper's D4RL versions (d4rl_source's defaults); locomotion: v2
NAMES = {"ilq": "ILQ", "no-imagination": "w/o imagination", "no-limitation": "w/o limitation"}
# flags this script sets in every ilq_jax.py run, and what to give instead
OWN_FLAGS = {"--env-id": "--tasks or --tables", "--dataset-path": "--dataset-dir", "--methods": "--methods or --ablations",
             "--num-seeds": "--num-seeds", "--budget": "--budget", "--run-name": "nothing (OUT/runs/<dataset>)",
             "--model-dir": "nothing (OUT/models)", "--resume": "nothing (the same command again continues)",
             "--evaluate": "ilq_jax.py itself", "--plot": "ilq_jax.py itself"}  # fmt: skip
RESUME_FLAGS = {ilq.flag(f) for f in ilq.MAY_ADD["resume"]}  # the only flags a --resume takes (and keeps taking)
STOPPED = (130, 143)  # ilq_jax.py's exit codes after SIGINT / SIGTERM, with a checkpoint
BOOTSTRAP_REPS = 2000  # stratified-bootstrap resamples (rliable)
POLL_S = 1.0  # how often the jobs and run folders are looked at
LINE_EVERY_S = 60.0  # a running job's progress line at most this often (a state change always gets one)
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # submitit's local executor ends a job after its timeout_min: none here


def fail(message: str) -> None:
    """Bad input or a missing dataset: one paragraph, exit code 2, before any job starts."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def say(line: str) -> None:
    print(f"[tables] {line}", flush=True)


# ------------------------------------------------------------------------------------------------ the datasets


def paper_row(task: str) -> tuple:
    """The paper's row whose protocol a dataset follows, and whether it holds the paper's data: (hopper-medium, True)
    for hopper-medium(-v2); (hopper-random, False) for ilq-local/hopper/random-v0 or hopper-random-v0; (None, False)."""
    d4rl = ilq.parse_d4rl_name(task)
    if d4rl and d4rl[0] in PAPER:
        return d4rl[0], d4rl[1] in (None, PAPER_VERSION.get(d4rl[0].split("-")[0], "v2"))
    local = ilq.LOCAL_RE.fullmatch(task)
    return (f"{local.group(1)}-{local.group(2)}", False) if local else (None, False)


def table_of(task: str) -> str:
    """Which table a dataset's row goes to: 1 or 2 for the paper's own data, other for anything else."""
    row, same = paper_row(task)
    return ("1" if row in TABLE_1 else "2") if same else "other"


def locate(task: str, dataset_dir: str) -> tuple:
    """(the --dataset-path of its runs or None, None) where a dataset is on disk or made on demand; (None, where it was
    looked for and how to get it) where not."""
    if d4rl := ilq.parse_d4rl_name(task):
        url, fname = ilq.d4rl_source(*d4rl)
        path = os.path.join(dataset_dir, fname)
        return (path, None) if os.path.exists(path) else (None, f"{task}: looked for {path}; download {url}")
    local = ilq.LOCAL_RE.fullmatch(task)
    if local and local.group(2) == "random":
        return None, None  # ilq_jax.py generates it
    folder = os.path.join(os.path.expanduser(os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")), task)
    how = f"python benchmarks/make_datasets.py --robot {local.group(1)}" if local else f"minari download {task}"
    return (None, None) if os.path.isdir(folder) else (None, f"{task}: looked for {folder} (Minari's folder); run `{how}`")


# ----------------------------------------------------------------------------------------------------- a job


@dataclass
class TrainJob(submitit.helpers.Checkpointable):
    """One dataset's training as a submitit job: `python ilq_jax.py ...` in OUT, a new run or (once its run folder has
    a checkpoint) --resume, its output appended to its log; returns its exit code (130/143: stopped by a signal, with a
    checkpoint). Only the standard library runs here, so a job never imports JAX besides ilq_jax.py's own."""

    new_argv: list
    resume_argv: list
    run_dir: str
    out: str
    log: str
    env: dict
    proc: Optional[subprocess.Popen] = None

    def __call__(self) -> int:
        resume = os.path.exists(os.path.join(self.run_dir, "checkpoint.msgpack"))  # a requeued job continues its run
        argv = self.resume_argv if resume else self.new_argv
        with open(self.log, "a") as log:
            print(f"[paper_tables] {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}", file=log, flush=True)
            # its own session, SIGUSR2 ignored: every signal comes from this job, once (a second one would end
            # ilq_jax.py without a checkpoint), and SLURM's warning before the time limit is submitit's (checkpoint)
            self.proc = subprocess.Popen(
                argv, cwd=self.out, stdout=log, stderr=subprocess.STDOUT, env=environment(self.env),
                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN),
            )  # fmt: skip
            print(f"[paper_tables] ilq_jax.py pid {self.proc.pid}", file=log, flush=True)
            try:
                return self.proc.wait()
            except KeyboardInterrupt:  # the local executor cancels a job with SIGINT: ilq_jax.py checkpoints and ends
                self.proc.send_signal(signal.SIGTERM)
                return self.proc.wait()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """submitit, on SLURM's signal before the time limit (or a pre-emption): ilq_jax.py checkpoints and ends, the
        job is requeued and continues the run."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait()
        self.proc = None  # a process does not pickle
        return submitit.helpers.DelayedSubmission(self)


def environment(changes: dict) -> dict:
    """This process's environment with the job's changes; a change to None removes the variable."""
    return {k: v for k, v in {**os.environ, **changes}.items() if v is not None}


if __name__ != "__main__":  # imported: jobs still unpickle TrainJob by value, without importing this module (and JAX)
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --------------------------------------------------------------------------------------------- run folders


_PROGRESS = {}  # checkpoint path -> (its mtime, what it says): a checkpoint is read again only when it changed


def progress_of(run_dir: str) -> dict:
    """Updates done and the last evaluation (per method, the mean over seeds) of a run, from its checkpoint."""
    path = os.path.join(run_dir, ilq.CHECKPOINT)
    try:
        mtime = os.stat(path).st_mtime_ns
        if _PROGRESS.get(path, (None,))[0] != mtime:
            p = ilq.read_checkpoint(run_dir)[0]
            methods, seeds = p["record"]["protocol"]["methods"], p["record"]["protocol"]["seeds"]
            rows = [ilq.method_rows(g, len(methods) * len(seeds), len(methods)) for g in range(len(methods))]
            last = p["normalized_scores"][-1] if p["eval_steps"] else None  # None: data without reference scores
            scores = last and (p["eval_steps"][-1], {m: float(np.mean(last[r])) for m, r in zip(methods, rows)})
            _PROGRESS[path] = mtime, dict(updates=p["updates"], evaluation=scores, checkpoint=True)
        return _PROGRESS[path][1]
    except (OSError, ilq.ILQError, KeyError):  # no checkpoint yet (pretraining), or one being replaced
        return dict(updates=0, evaluation=None, checkpoint=False)


def read_summary(run_dir: str):
    """A run's summary.json, or None where it has none (yet) or it cannot be read (being written)."""
    try:
        return json.load(open(os.path.join(run_dir, "summary.json")))
    except (OSError, ValueError):
        return None


def run_state(run_dir: str) -> dict:
    """What a dataset's run folder says: waiting (no run yet, or one that never trained), running (its lock is held),
    done (summary.json at the budget), time box (a summary short of the budget), stopped (a checkpoint, no summary)."""
    if not os.path.isdir(run_dir):
        return dict(state="waiting", updates=0)
    try:
        ilq.lock_run_folder(run_dir).close()
    except ilq.ILQError:
        return dict(state="running", **progress_of(run_dir))
    summary = read_summary(run_dir)
    if summary and summary["updates"] >= summary["args"]["total_steps"]:
        return dict(state="done", updates=summary["updates"], summary=summary)
    p = progress_of(run_dir)
    if not p["checkpoint"]:
        return dict(state="waiting", updates=0)
    if summary and summary["updates"] == p["updates"]:
        return dict(state="time box", summary=summary, **p)
    return dict(state="stopped", **p)


def cell(mean, std) -> str:
    """mean ± std as the tables print it; — for no number."""
    return "—" if mean is None else f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def describe(st: dict, total: int, methods: tuple) -> str:
    """A dataset's state in one line."""
    s = st["state"]
    if st.get("summary"):
        res = st["summary"]["methods"]
        scores = ", ".join(
            f"{NAMES[m]} {cell(res[m]['final_normalized_score'], res[m]['final_normalized_score_std'])}" for m in methods
        )
        if s == "done":
            return f"done: {scores} at {st['updates']} updates"
        return f"time box: {scores} at {st['updates']} of {total} updates (the next run of this command continues it)"
    if s == "stopped":
        return f"stopped at update {st['updates']} of {total} (the next run of this command resumes it)"
    if s in ("running", "submitted") and st.get("checkpoint"):
        line = f"running: update {st['updates']} of {total}"
        if st.get("evaluation"):
            at, scores = st["evaluation"]
            line += f", last evaluation (update {at}): " + ", ".join(f"{NAMES[m]} {v:.1f}" for m, v in scores.items())
        return line
    if s == "running":
        return "running: dataset and pretraining"
    if s == "failed":
        return f"failed (log {st['log']})"
    return s + (f" ({st['note']})" if st.get("note") else "")


# -------------------------------------------------------------------------------------------------- tables


def finished(row: dict) -> bool:
    """A row in the totals and aggregates: its run reached the budget, with a normalised score for every seed."""
    return row["state"] == "done" and all(None not in v["seeds"] for v in row["methods"].values())


def table_rows(tasks: list, states: dict, methods: tuple, total: int) -> list:
    """Per dataset, as tables.json keeps it: state, updates, the paper's row (and whether it is comparable), ours per
    method (mean, std, per seed), ILQ's difference to the paper."""
    rows = []
    for task in tasks:
        st, (name, same) = states[task], paper_row(task)
        paper = dict(task=name, mean=PAPER[name][0], std=PAPER[name][1], comparable=same) if name in PAPER else None
        summary = st.get("summary")
        row = dict(task=task, state=st["state"], updates=st["updates"], paper=paper, methods={}, log=st.get("log"))
        row["total_steps"] = summary["args"]["total_steps"] if summary else total
        for m in methods if summary else ():
            s = summary["methods"][m]
            seeds = [x["final_normalized_score"] for x in s["seeds"]]
            row["methods"][m] = dict(mean=s["final_normalized_score"], std=s["final_normalized_score_std"], seeds=seeds)
        row["difference"] = (
            row["methods"]["ilq"]["mean"] - paper["mean"]
            if paper and same and "ilq" in row["methods"] and row["methods"]["ilq"]["mean"] is not None
            else None
        )
        rows.append(row)
    return rows


def totals_of(spec: dict, rows: list, methods: tuple) -> list:
    """The totals the paper prints, over the rows that finished: ours, the paper's over the same rows, its printed one."""
    out = []
    for label, members, printed in spec["totals"]:
        mine = [r for r in rows if r["paper"] and r["paper"]["task"] in members]
        done = [r for r in mine if finished(r)]
        ours = {m: sum(r["methods"][m]["mean"] for r in done) for m in methods} if done else None
        out.append(dict(label=label, datasets=len(members), requested=len(mine), finished=len(done), ours=ours,
                        paper_same_rows=round(sum(r["paper"]["mean"] for r in done), 1), paper_total=printed))  # fmt: skip
    return out


def aggregate(rows: list, methods: tuple):
    """rliable over the finished rows (datasets x seeds): the interquartile mean of each method with stratified-bootstrap
    95 % intervals, and the probability that ILQ improves on each other method; None before a row finished."""
    done = [r for r in rows if finished(r)]
    if not done:
        return None
    from rliable import library as rly
    from rliable import metrics

    scores = {m: np.array([r["methods"][m]["seeds"] for r in done]).T for m in methods}  # (seeds, datasets)
    pairs = {m: (scores["ilq"], scores[m]) for m in methods if m != "ilq" and "ilq" in methods}
    with warnings.catch_warnings():  # arch's notice that RandomState is deprecated: it still seeds the resamples
        warnings.simplefilter("ignore", FutureWarning)
        iqm = rly.get_interval_estimates(scores, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=BOOTSTRAP_REPS,
                                         random_state=np.random.RandomState(0))  # fmt: skip
        poi = rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=BOOTSTRAP_REPS,
                                         random_state=np.random.RandomState(0)) if pairs else ({}, {})  # fmt: skip
    estimate = lambda est, m: dict(point=float(np.ravel(est[0][m])[0]), ci=[float(v) for v in np.ravel(est[1][m])])
    return dict(datasets=len(done), seeds=scores[methods[0]].shape[0], reps=BOOTSTRAP_REPS, scores=scores,
                iqm={m: estimate(iqm, m) for m in methods}, ilq_improves_on={m: estimate(poi, m) for m in pairs})  # fmt: skip


def draw(spec: dict, rows: list, states: dict, agg, out: str, methods: tuple) -> list:
    """The performance profile of the finished rows (rliable, with its bootstrap bands) and one panel of learning curves
    per dataset with results; returns the files written."""
    from matplotlib.figure import Figure

    files = []
    if agg:
        from rliable import library as rly
        from rliable import plot_utils

        values = np.concatenate([v.ravel() for v in agg["scores"].values()])
        taus = np.linspace(min(0.0, math.floor(values.min())), max(1.0, math.ceil(values.max())), 101)
        profiles, cis = rly.create_performance_profile({NAMES[m]: v for m, v in agg["scores"].items()}, taus, reps=agg["reps"])
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.subplots()
        plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=cis, ax=ax,
                                             xlabel="normalised score τ", ylabel="fraction of runs above τ")  # fmt: skip
        ax.legend()
        ax.set_title(f"{agg['datasets']} dataset(s) x {agg['seeds']} seeds")
        files.append(f"{spec['file']}_profile.png")
        fig.savefig(os.path.join(out, files[-1]), dpi=100)
    drawn = [r for r in rows if states[r["task"]].get("summary")]
    if drawn:
        cols = min(4, len(drawn))
        fig = Figure(figsize=(4 * cols, 3 * math.ceil(len(drawn) / cols)), layout="constrained")
        axes = np.ravel(fig.subplots(math.ceil(len(drawn) / cols), cols, squeeze=False))
        for ax, r in zip(axes, drawn):
            summary = states[r["task"]]["summary"]
            for m in methods:
                curves = [s["normalized_scores"] for s in summary["methods"][m]["seeds"]]
                if all(None not in c for c in curves):
                    ax.plot(summary["eval_steps"], np.mean(curves, 0), label=NAMES[m])
            ax.set(title=r["task"], xlabel="updates", ylabel="normalised score (mean over seeds)")
        axes[0].legend()
        for ax in axes[len(drawn) :]:
            ax.set_axis_off()
        files.append(f"{spec['file']}_curves.png")
        fig.savefig(os.path.join(out, files[-1]), dpi=80)
    return files


def markdown(spec: dict, rows: list, totals: list, agg, files: list, methods: tuple, num_seeds: int) -> str:
    """A table in the paper's layout: per dataset ours (the first method, then the others), the paper's ILQ, the
    difference, the updates reached, the state; the paper's totals; the aggregates and figures below."""
    other = spec["file"] == TABLES["other"]["file"]
    paper = "paper's ILQ (the D4RL row these data follow)" if other else "paper's ILQ"
    line = lambda first, rest: "| " + " | ".join([*first, *rest]) + " |"  # dataset ... updates | the other methods, state
    head = line(
        ["dataset", f"{NAMES[methods[0]]} (ours)", paper, "ours − paper", "updates"],
        [f"{NAMES[m]} (ours)" for m in methods[1:]] + ["state"],
    )
    lines = [
        f"# {spec['title']}",
        "",
        f"Normalised score: per seed the mean of its last 10 evaluations, then mean ± sample std over {num_seeds} seeds. "
        "The paper's column: Liu et al., IJCAI 2025, Tables 1-2 (ILQ, 5 seeds, 10^6 updates, last 10 evaluations). "
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
        head,
        "|" + "---|" * (len(methods) + 5),
    ]
    for r in rows:
        ours = [cell(r["methods"][m]["mean"], r["methods"][m]["std"]) if m in r["methods"] else "—" for m in methods]
        ref = "—" if not r["paper"] else cell(r["paper"]["mean"], r["paper"]["std"])
        if r["paper"] and not r["paper"]["comparable"]:
            ref += f" ({r['paper']['task']}; not comparable: other data)"
        diff = "—" if r["difference"] is None else f"{r['difference']:+.1f}"
        state = {"done": "done", "time box": "time box: not in the totals", "failed": f"failed (log: {r['log']})"}
        state = state.get(r["state"], r["state"] + (f" (update {r['updates']})" if r["updates"] else ""))
        lines.append(line([r["task"], ours[0], ref, diff, f"{r['updates']} of {r['total_steps']}"], ours[1:] + [state]))
    for t in totals:
        label, ours = f"**{t['label']}**", t["ours"]
        if not ours:
            lines.append(line([label, "no dataset finished yet", str(t["paper_total"]), "—", ""], [""] * len(methods)))
            continue
        sums = [f"{ours[m]:.1f}" for m in methods]
        first = f"{sums[0]} ({t['finished']} of {t['datasets']} datasets finished)"
        ref = f"{t['paper_total']} (the same {t['finished']}: {t['paper_same_rows']:.1f})"
        diff = f"{ours['ilq'] - t['paper_same_rows']:+.1f}" if methods[0] == "ilq" else "—"
        lines.append(line([label, first, ref, diff, ""], sums[1:] + [""]))
    lines.append("")
    if agg:
        ci = lambda e: f"{e['point']:.1f} [{e['ci'][0]:.1f}, {e['ci'][1]:.1f}]"
        lines.append(
            f"Interquartile mean over the {agg['datasets']} finished dataset(s) x {agg['seeds']} seeds, with 95 % "
            f"stratified-bootstrap intervals ({agg['reps']} resamples, rliable): "
            + "; ".join(f"{NAMES[m]} {ci(e)}" for m, e in agg["iqm"].items())
            + "."
        )
        if agg["ilq_improves_on"]:
            p = lambda e: f"{e['point']:.2f} [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}]"
            lines += ["", "Probability that ILQ improves on (rliable, 95 % intervals): "
                      + "; ".join(f"{NAMES[m]} {p(e)}" for m, e in agg["ilq_improves_on"].items()) + "."]  # fmt: skip
    else:
        lines.append("Interquartile mean: no dataset finished yet.")
    lines += [""] + [f"![{f}]({f})" for f in files]
    return "\n".join(lines) + "\n"


def write_tables(out: str, tasks: list, states: dict, methods: tuple, num_seeds: int, total: int) -> list:
    """OUT/table1.md, table2.md, table_other.md (each where it has a dataset), their figures, and OUT/tables.json;
    left as they are when their rows have not changed since they were written (the bootstrap takes seconds)."""
    tables = {}  # key -> (spec, rows)
    for key, spec in TABLES.items():
        mine = sorted(
            (t for t in tasks if table_of(t) == key),
            key=lambda t: spec["tasks"].index(paper_row(t)[0]) if spec["tasks"] else 0,
        )
        if mine:
            tables[key] = spec, table_rows(mine, states, methods, total)
    path, written = os.path.join(out, "tables.json"), [os.path.join(out, spec["file"] + ".md") for spec, _ in tables.values()]
    old = json.load(open(path)) if os.path.exists(path) else {}
    same = {spec["file"]: rows for spec, rows in tables.values()} == {f: t["rows"] for f, t in old.get("tables", {}).items()}
    if same and all(map(os.path.exists, written)):
        return written
    everything = dict(written=time.strftime("%Y-%m-%d %H:%M:%S"), methods=list(methods), tables={})
    for spec, rows in tables.values():
        totals, agg = totals_of(spec, rows, methods), aggregate(rows, methods)
        files = draw(spec, rows, states, agg, out, methods)
        with open(os.path.join(out, spec["file"] + ".md"), "w") as f:
            f.write(markdown(spec, rows, totals, agg, files, methods, num_seeds))
        agg = agg and {k: v for k, v in agg.items() if k != "scores"}
        everything["tables"][spec["file"]] = dict(title=spec["title"], rows=rows, totals=totals, aggregate=agg, figures=files)
    ilq._atomic_write(path, json.dumps(everything, indent=2).encode())
    return written


# ------------------------------------------------------------------------------------------------ the command


def parse(argv: list) -> argparse.Namespace:
    """The flags, checked, with the tasks, the executor and the flags of every ilq_jax.py run resolved; exits with one
    paragraph on bad input."""
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default=None, help="the paper's tables, comma-separated: 1, 2 (default 1,2 without --tasks)")
    p.add_argument("--tasks", default=None, help="datasets (ilq_jax.py --env-id values), comma-separated; with --tables: both")
    p.add_argument("--methods", default="ilq", help=f"comma-separated from {', '.join(ilq.METHODS)} (default ilq)")
    p.add_argument("--ablations", action="store_true", help="also the ablations no-imagination, no-limitation (Sec. 5.4)")
    p.add_argument("--num-seeds", type=int, default=5, help="seeds per method (the paper's 5)")
    p.add_argument("--budget", choices=("paper", "cpu"), default="paper", help="ilq_jax.py's --budget (the paper's)")
    p.add_argument("--out", required=True, help="folder of the runs, logs, models and tables")
    d4rl = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets"))
    p.add_argument("--dataset-dir", default=d4rl, help=f"folder of D4RL's HDF5 files (default D4RL's cache: {d4rl})")
    p.add_argument("--executor", choices=("local", "slurm", "auto"), default="auto", help="auto: slurm where sbatch exists")
    p.add_argument("--max-parallel", type=int, default=None, help="jobs at once (here: one per GPU, 1 on a CPU; SLURM: all)")
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    p.add_argument("--account", default=None, help="SLURM account (default: yours)")
    p.add_argument("--gpus-per-job", type=int, default=1, help="SLURM GPUs per job (ilq_jax.py shards the learners over them)")
    p.add_argument("--time-limit-min", type=int, default=24 * 60, help="SLURM time limit of a job in minutes; then requeued")
    p.add_argument("--requeues", type=int, default=10, help="SLURM requeues of a job at its time limit, each continuing")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="any other submitit SlurmExecutor parameter, e.g. qos=high, cpus_per_task=8, mem=64G (repeatable; "
                   "VALUE as JSON where it parses, else text)")  # fmt: skip
    a = p.parse_args(ours)
    a.out, a.dataset_dir = os.path.abspath(a.out), os.path.abspath(os.path.expanduser(a.dataset_dir))
    bad = []
    tables = [t.strip() for t in (a.tables or ("1,2" if a.tasks is None else "")).split(",") if t.strip()]
    bad += [f"--tables names {t}; the paper's tables are 1 and 2" for t in tables if t not in ("1", "2")]
    tasks = [t for k in tables if k in ("1", "2") for t in TABLES[k]["tasks"]]
    tasks += [t.strip() for t in (a.tasks or "").split(",") if t.strip() and t.strip() not in tasks]
    bad += [f"--tasks names '{t}', neither a D4RL name (e.g. hopper-medium) nor a Minari id (namespace/name-vN)"
            for t in tasks if not ilq.parse_d4rl_name(t) and "/" not in t]  # fmt: skip
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] + (["no-imagination", "no-limitation"] * a.ablations)
    bad += [f"--methods names '{m}'; choose from {', '.join(ilq.METHODS)}" for m in methods if m not in ilq.METHODS]
    a.methods = tuple(m for m in ilq.METHODS if m in methods)  # ILQ first: the tables' first column
    bad += [] if a.methods else ["--methods names no method"]
    for name in ("num_seeds", "max_parallel", "gpus_per_job", "time_limit_min"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            bad.append(f"{ilq.flag(name)} ({getattr(a, name)}) must be positive")
    groups = []  # the flags after --, each with its value
    for token in rest:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    bad += [
        f"{g[0]} after -- is this script's to set: give {OWN_FLAGS[g[0].split('=')[0]]}"
        for g in groups
        if g[0].split("=")[0] in OWN_FLAGS
    ]
    a.slurm_params = {}
    for kv in a.slurm:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            bad.append(f"--slurm {kv} is not KEY=VALUE")
            continue
        try:
            a.slurm_params[key] = json.loads(value)
        except ValueError:
            a.slurm_params[key] = value
    bad += [] if tasks else ["--tables and --tasks name no dataset"]
    if bad:
        fail("; ".join(bad) + ". Nothing was started.")
    a.tasks = tasks
    a.resume_flags = [x for g in groups if g[0].split("=")[0] in RESUME_FLAGS for x in g]
    a.train_flags = [x for g in groups if g[0].split("=")[0] not in RESUME_FLAGS for x in g]
    try:  # every ilq_jax.py flag checked here, before any job: the runs of every dataset share them
        args = ilq.resolve_args(ilq.parse_args(new_argv(a, tasks[0], None)[2:]))
    except ilq.ILQError as e:
        fail(f"the flags after -- are refused by ilq_jax.py: {e} Nothing was started.")
    a.total_steps, a.learners = args.total_steps, len(a.methods) * a.num_seeds
    a.executor = a.executor if a.executor != "auto" else "slurm" if shutil.which("sbatch") else "local"
    a.gpus = visible_gpus() if a.executor == "local" else []
    a.max_parallel = a.max_parallel or (max(1, len(a.gpus)) if a.executor == "local" else len(tasks))
    return a


def new_argv(a, task: str, path) -> list:
    """A new run of a dataset: OUT/runs/<dataset>, models in OUT/models, the flags after --."""
    argv = [sys.executable, os.path.join(ROOT, "ilq_jax.py"), "--env-id", task, *(["--dataset-path", path] if path else [])]
    argv += ["--methods", ",".join(a.methods), "--num-seeds", str(a.num_seeds), "--budget", a.budget]
    return argv + ["--run-name", ilq.slug(task), "--model-dir", os.path.join(a.out, "models"), *a.train_flags, *a.resume_flags]


def visible_gpus() -> list:
    """This machine's GPUs as CUDA indices (CUDA_VISIBLE_DEVICES, else nvidia-smi), found without starting JAX, which
    would take memory on every GPU from this process."""
    if (given := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        names = [g.strip() for g in given.split(",") if g.strip()]
    elif shutil.which("nvidia-smi"):
        found = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
        names = found.stdout.split() if found.returncode == 0 else []
    else:
        names = []
    if not all(n.isdigit() for n in names):
        fail(f"CUDA_VISIBLE_DEVICES ({given}) names GPUs by UUID; give their indices (nvidia-smi -L lists both).")
    return [int(n) for n in names]


def make_executor(a):
    """submitit's executor: LocalExecutor here (no time limit), SlurmExecutor with the SLURM flags and --slurm."""
    folder = os.path.join(a.out, "submitit")
    if a.executor == "local":
        ex = submitit.LocalExecutor(folder)
        ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
        return ex
    ex = submitit.SlurmExecutor(folder, max_num_timeout=a.requeues)
    given = dict(partition=a.partition, account=a.account, gpus_per_node=a.gpus_per_job, time=a.time_limit_min)
    try:
        ex.update_parameters(**{**{k: v for k, v in given.items() if v is not None}, **a.slurm_params})
    except ValueError as e:
        valid = ", ".join(sorted(ex._valid_parameters()))
        fail(f"--slurm: submitit refuses the SLURM parameters ({str(e).splitlines()[0]}); it takes {valid}.")
    return ex


def report(a) -> int:
    """Another invocation holds OUT: the state of every dataset, nothing started."""
    path = os.path.join(a.out, "paper_tables.json")
    tasks = list(dict.fromkeys((json.load(open(path))["tasks"] if os.path.exists(path) else []) + a.tasks))
    for task in tasks:
        say(f"{task}: {describe(run_state(os.path.join(a.out, 'runs', ilq.slug(task))), a.total_steps, a.methods)}")
    say(f"another paper_tables.py runs on {a.out} (it holds {a.out}/.lock): nothing was started here; it writes the tables")
    return 0


def settings_of(a) -> tuple:
    """OUT's settings (methods, seeds, budget, flags after --) are those of its first invocation: a later one must ask
    for the same (only --stop-after, --time-box-min and --eval-workers may change). (the settings, the datasets of
    every invocation)."""
    path = os.path.join(a.out, "paper_tables.json")
    mine = dict(methods=list(a.methods), num_seeds=a.num_seeds, budget=a.budget, train_flags=a.train_flags)
    saved = json.load(open(path)) if os.path.exists(path) else dict(mine, tasks=[])
    if changed := [k for k in mine if saved[k] != mine[k]]:
        fail(
            f"{a.out} holds runs with other settings ({', '.join(f'{k} {saved[k]}' for k in changed)}; this command asks "
            f"for {', '.join(f'{k} {mine[k]}' for k in changed)}). Run it with those settings to continue there, or give "
            "another --out. Nothing was started."
        )
    return mine, saved["tasks"] + [t for t in a.tasks if t not in saved["tasks"]]


def log_tail(path: str, n: int = 15) -> str:
    """The last n lines of a job's log, indented under the line that names it."""
    try:
        return "".join("    " + line for line in open(path, errors="replace").readlines()[-n:])
    except OSError:
        return "    (no log)\n"


def overall(states: dict, a, t0: float, start: int) -> str:
    """Jobs done, learner-updates done of the total, time left from this invocation's rate."""
    count = Counter(st["state"] for st in states.values())
    done = sum(min(st["updates"], a.total_steps) for st in states.values()) * a.learners
    total = len(states) * a.total_steps * a.learners
    rate = (done - start) / max(time.time() - t0, 1e-9)
    if done >= total:
        left = "nothing left"
    elif rate > 0:
        s = (total - done) / rate
        left = f"time left ~{f'{s:.0f} s' if s < 90 else f'{s / 60:.0f} min' if s < 5400 else f'{s / 3600:.1f} h'}"
    else:
        left = "time left: unknown until progress"
    others = "".join(f", {n} {s}" for s, n in count.items() if s != "done")
    return (
        f"{count['done']}/{len(states)} datasets done{others} | learner-updates {done} of {total} "
        f"({100 * done / max(total, 1):.0f} %) | {left}"
    )


def run(a) -> int:
    """Every dataset to its end: skip the finished, resume the stopped, start the new, retry a failure once; a line per
    change, the tables after every finished job. Exit code 0 when every dataset is done, else 1."""
    os.makedirs(a.out, exist_ok=True)
    try:
        lock = ilq.lock_run_folder(a.out)  # one invocation drives OUT's jobs at a time
    except ilq.ILQError:
        return report(a)
    try:
        return drive(a, *settings_of(a))
    except KeyboardInterrupt:
        say("interrupted: local runs checkpoint and end, SLURM jobs go on; the same command again continues them")
        return 130
    finally:
        lock.close()


def drive(a, settings: dict, tasks: list) -> int:
    """run() once OUT is this invocation's: every dataset classified, the missing listed, then the jobs to their end."""
    run_dir = lambda task: os.path.join(a.out, "runs", ilq.slug(task))
    states = {t: run_state(run_dir(t)) for t in tasks}
    paths = {t: locate(t, a.dataset_dir) for t in tasks if states[t]["state"] in ("waiting", "stopped", "time box")}
    if missing := [problem for _, problem in paths.values() if problem]:
        fail(
            f"{len(missing)} dataset(s) the tables need are not on disk; nothing was started:\n  "
            + "\n  ".join(missing)
            + f"\nPut D4RL's files into {a.dataset_dir} (e.g. `wget -P {a.dataset_dir} URL`) or name their folder with "
            "--dataset-dir; make the ilq-local ones with benchmarks/make_datasets.py; then run this command again."
        )
    ilq._atomic_write(os.path.join(a.out, "paper_tables.json"), json.dumps(dict(settings, tasks=tasks), indent=2).encode())
    os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
    ex, jobs_file = make_executor(a), os.path.join(a.out, "jobs.json")
    recorded = json.load(open(jobs_file)) if os.path.exists(jobs_file) else {}
    active, attempts, free = {}, {}, list(range(a.max_parallel))  # task -> (job, slot); a slot: a GPU here, or a place
    for t, rec in recorded.items():  # SLURM jobs of an earlier invocation, queued or running: followed, never resubmitted
        if rec["executor"] == a.executor == "slurm" and states.get(t, {}).get("state") != "done" and free:
            job = submitit.SlurmJob(folder=os.path.join(a.out, "submitit"), job_id=rec["job_id"])
            if not job.done(force_check=True):
                active[t], attempts[t] = (job, free.pop(0)), 1
                states[t] = dict(state="submitted", updates=states[t]["updates"], note=f"SLURM job {rec['job_id']}")
    queue = [t for t in tasks if t in paths and t not in active]
    for t in tasks:
        say(f"{t}: {describe(states[t], a.total_steps, a.methods)}")
    t0, start = time.time(), sum(min(st["updates"], a.total_steps) for st in states.values()) * a.learners
    tables = lambda: write_tables(a.out, tasks, states, a.methods, a.num_seeds, a.total_steps)
    written, shown = tables(), {}  # shown: task -> (its last line, when, its state then)

    def show(task: str) -> None:
        st, (line, when, was) = states[task], shown.get(task, ("", 0.0, None))
        new = describe(st, a.total_steps, a.methods)
        if new != line and (st["state"] != was or time.time() - when >= LINE_EVERY_S):
            shown[task] = new, time.time(), st["state"]
            say(f"{task}: {new}")
            say(overall(states, a, t0, start))

    try:
        while queue or active or any(st["state"] == "running" for st in states.values()):
            while queue and free:
                task, slot = queue.pop(0), free.pop(0)
                if os.path.isdir(run_dir(task)):
                    ilq.remove_if_never_trained(run_dir(task))  # left by a kill -9 in pretraining
                log, env = os.path.join(a.out, "logs", ilq.slug(task) + ".log"), dict(PYTHONUNBUFFERED="1")
                resume = [sys.executable, os.path.join(ROOT, "ilq_jax.py"), "--resume", os.path.join("runs", ilq.slug(task))]
                where = ""
                if a.gpus:  # one GPU per job (shared when --max-parallel exceeds them: then no preallocated memory)
                    where = f" on GPU {a.gpus[slot % len(a.gpus)]}"
                    ex.update_parameters(gpus_per_node=1, visible_gpus=(a.gpus[slot % len(a.gpus)],))
                    env.update({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if a.max_parallel > len(a.gpus) else {})
                elif a.executor == "local":  # no GPU found: the job sees what this process sees (submitit would hide all)
                    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
                if a.executor == "slurm":
                    ex.update_parameters(job_name="ilq-" + ilq.slug(task))
                job = ex.submit(
                    TrainJob(new_argv(a, task, paths[task][0]), resume + a.resume_flags, run_dir(task), a.out, log, env)
                )
                active[task], attempts[task] = (job, slot), attempts.get(task, 0) + 1
                states[task] = dict(
                    state="submitted", updates=states[task]["updates"], note=f"{a.executor} job {job.job_id}{where}"
                )
                recorded[task] = dict(executor=a.executor, job_id=job.job_id, log=log)
                ilq._atomic_write(jobs_file, json.dumps(recorded, indent=2).encode())
                show(task)
            time.sleep(POLL_S)
            for task, (job, slot) in list(active.items()):
                if not job.done():
                    if os.path.isdir(run_dir(task)):
                        states[task] = dict(state="running", **progress_of(run_dir(task)))
                        show(task)
                    continue
                del active[task]
                free.append(slot)
                try:
                    code, why = job.result(), None
                except submitit.core.utils.UncompletedJobError as e:  # the job died, or ran out of requeues
                    code, why = None, e
                st, log = run_state(run_dir(task)), recorded[task]["log"]
                if (
                    st["state"] in ("done", "time box")
                    or st["state"] == "stopped"
                    and (code in STOPPED or type(why) is submitit.core.utils.UncompletedJobError)
                ):
                    states[task] = st
                elif attempts[task] == 1:
                    say(f"{task}: failed ({f'exit code {code}' if why is None else why}): retrying once; log {log}")
                    queue.insert(0, task)
                    continue
                else:
                    states[task] = dict(st, state="failed", log=os.path.relpath(log, a.out))
                    say(f"{task}: failed again ({f'exit code {code}' if why is None else why}); log {log}, its last lines:")
                    print(log_tail(log), end="", flush=True)
                show(task)
                written = tables()
            for task, st in states.items():  # a run of another process (an earlier invocation's job): taken over at its end
                if st["state"] == "running" and task not in active:
                    states[task] = run_state(run_dir(task))
                    show(task)
                    if states[task]["state"] == "running":
                        continue
                    if states[task]["state"] in ("waiting", "stopped", "time box"):
                        paths[task] = paths.get(task) or locate(task, a.dataset_dir)
                        queue.append(task)
                    written = tables()
    except KeyboardInterrupt:
        for job, _ in active.values():
            if isinstance(job, submitit.LocalJob):
                job.cancel()  # its ilq_jax.py checkpoints and ends
        tables()
        raise
    if not shown:  # nothing changed here: the state of OUT (else the last change's line said it)
        say(overall(states, a, t0, start))
    say(f"tables: {', '.join(written)}, {a.out}/tables.json")
    if left := [t for t in tasks if states[t]["state"] != "done"]:
        named = ", ".join(f"{t} ({states[t]['state']})" for t in left)
        say(f"not done: {named}; the same command again continues them")
    return 1 if left else 0


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM (a job scheduler, timeout) stops as Ctrl-C does
    return run(parse(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
