"""benchmarks/paper_tables.py (issue 39): the paper's tables through submitit's local executor, on two generated
datasets x 2 seeds at the tiny budget: the tables, a job stopped by SIGTERM and resumed by the next invocation (equal
to an unstopped run), an invocation with nothing left to train, one beside a running one; missing datasets listed
before any job; the SLURM parameters built from the flags; the paper's numbers against its printed totals."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY

import ilq_jax as ilq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import paper_tables as pt  # noqa: E402

TASKS = ("ilq-local/hopper/random-v0", "ilq-local/walker2d/random-v0")
STOPPED = TASKS[1]  # sent SIGTERM mid-way: no other test trains its shapes, so its first update compiles for seconds
FLAGS = ["--tasks", ",".join(TASKS), "--num-seeds", "2", "--executor", "local", "--max-parallel", "2"]


def _env(tmp) -> dict:
    return dict(os.environ, MINARI_DATASETS_PATH=str(tmp / "minari"), D4RL_DATASET_DIR=str(tmp / "d4rl"), PYTHONUNBUFFERED="1")


def _tables(tmp, *argv):
    """`python benchmarks/paper_tables.py ARGV` -> (exit code, stdout + stderr)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "paper_tables.py"), *argv], env=_env(tmp),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    return out.returncode, out.stdout + out.stderr


def _sigterm_when_training(log: str, proc, timeout=300) -> None:
    """SIGTERM to the ilq_jax.py of a job (its pid is in its log) once its learners are built: its first jitted update
    is compiling, so it stops after that call, with a checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        text = open(log).read() if os.path.exists(log) else ""
        if "learner(s) in one jitted call" in text:
            pid = int(re.search(r"ilq_jax\.py pid (\d+)", text).group(1))
            os.kill(pid, signal.SIGTERM)
            return
        time.sleep(0.05)
    raise AssertionError(f"the job never started training:\n{text[-3000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One OUT for the module: invocation A (the second job stopped by SIGTERM), B (resumes it), C (nothing left), and
    a plain ilq_jax.py run of the stopped dataset with the same flags."""
    tmp = tmp_path_factory.mktemp("tables")
    out, argv = tmp / "out", [*FLAGS, "--out", str(tmp / "out"), "--", *TINY]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", "paper_tables.py"), *argv], env=_env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        _sigterm_when_training(str(out / "logs" / (ilq.slug(STOPPED) + ".log")), proc)
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    a = proc.returncode, output
    stopped = ilq.read_checkpoint(out / "runs" / ilq.slug(STOPPED))[0]["updates"]
    b, c = _tables(tmp, *argv), _tables(tmp, *argv)
    plain = [sys.executable, os.path.join(ROOT, "ilq_jax.py"), "--env-id", STOPPED, "--methods", "ilq", "--num-seeds", "2"]
    plain += ["--budget", "paper", "--run-name", "plain", "--model-dir", str(out / "models"), *TINY]
    done = subprocess.run(plain, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return dict(tmp=tmp, out=out, argv=argv, a=a, b=b, c=c, stopped_at=stopped, plain=tmp / "runs" / "plain")


def test_the_tables_hold_both_datasets_with_numbers_the_paper_columns_and_the_iqm(runs):
    text = (runs["out"] / "table_other.md").read_text()
    for task, paper in zip(TASKS, ("31.6 ± 0.2 (hopper-random", "21.6 ± 0.1 (walker2d-random")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {task} |"))
        ours = r"-?\d+\.\d ± \d+\.\d"
        assert re.fullmatch(
            rf"\| {task} \| {ours} \| {re.escape(paper)}; not comparable: other data\) \| — \| 40 of 40 \| done \|", row
        )
    assert re.search(
        r"Interquartile mean over the 2 finished dataset\(s\) x 2 seeds, .*: ILQ -?\d+\.\d \[-?\d+\.\d, -?\d+\.\d\]", text
    )
    assert not (runs["out"] / "table1.md").exists() and not (runs["out"] / "table2.md").exists()  # no paper data here
    tables = json.load(open(runs["out"] / "tables.json"))["tables"]["table_other"]
    assert [r["task"] for r in tables["rows"]] == list(TASKS)
    for r in tables["rows"]:
        assert r["state"] == "done" and len(r["methods"]["ilq"]["seeds"]) == 2 and r["difference"] is None
        assert r["paper"]["comparable"] is False
    iqm = tables["aggregate"]["iqm"]["ilq"]
    assert iqm["ci"][0] <= iqm["point"] <= iqm["ci"][1] and tables["aggregate"]["datasets"] == 2
    assert {f for f in tables["figures"]} == {"table_other_profile.png", "table_other_curves.png"}
    assert all((runs["out"] / f).stat().st_size > 0 for f in tables["figures"])


def test_a_job_stopped_by_sigterm_is_resumed_by_the_next_invocation_and_equals_an_unstopped_run(runs):
    code, out = runs["a"]
    assert code == 1, out[-3000:]
    assert 0 < runs["stopped_at"] < 40, out[-3000:]
    assert f"{STOPPED}: stopped at update {runs['stopped_at']} of 40 (the next run of this command resumes it)" in out
    assert f"{TASKS[0]}: done: ILQ " in out and "learner-updates" in out
    code, out = runs["b"]
    assert code == 0, out[-3000:]
    assert f"{STOPPED}: submitted" in out and f"{TASKS[0]}: submitted" not in out and f"{STOPPED}: done: ILQ" in out
    assert "--resume runs/" + ilq.slug(STOPPED) in (runs["out"] / "logs" / (ilq.slug(STOPPED) + ".log")).read_text()
    resumed = json.load(open(runs["out"] / "runs" / ilq.slug(STOPPED) / "summary.json"))
    plain = json.load(open(runs["plain"] / "summary.json"))
    assert resumed["methods"]["ilq"]["seeds"] == plain["methods"]["ilq"]["seeds"]  # returns, scores, Q(data) per seed
    assert ilq.read_checkpoint(runs["out"] / "runs" / ilq.slug(STOPPED))[1] == ilq.read_checkpoint(runs["plain"])[1]


def test_a_second_invocation_trains_nothing_and_says_both_are_done(runs):
    code, out = runs["c"]
    assert code == 0, out[-3000:]
    assert "submitted" not in out and all(f"{t}: done: ILQ " in out for t in TASKS)
    assert "2/2 datasets done | learner-updates 160 of 160 (100 %) | nothing left" in out


def test_beside_a_running_invocation_another_only_reports(runs):
    out, walker = runs["out"], runs["out"] / "runs" / ilq.slug(STOPPED)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    locks = [ilq.lock_run_folder(str(out)), ilq.lock_run_folder(str(walker))]  # a driver and its job hold them
    try:
        code, text = _tables(runs["tmp"], *runs["argv"])
    finally:
        for lock in locks:
            lock.close()
    assert code == 0, text[-3000:]
    assert f"{STOPPED}: running: update 40 of 40, last evaluation (update 40): ILQ " in text
    assert f"{TASKS[0]}: done: ILQ " in text and "nothing was started here" in text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_missing_datasets_are_listed_in_one_message_before_any_job_starts(tmp_path):
    code, out = _tables(
        tmp_path, "--tables", "1,2", "--tasks", "ilq-local/hopper/medium-replay-v0", "--out", str(tmp_path / "o")
    )
    assert code == 2
    listed = re.findall(r"^  (\S+): looked for (\S+)", out, re.M)
    assert len(listed) == 21 and out.count("error:") == 1, out
    assert (tmp_path / "d4rl" / "hopper_medium-v2.hdf5").as_posix() in out and "gym_mujoco_v2/hopper_medium-v2.hdf5" in out
    assert "pen-v0_demos_clipped.hdf5" in out and "maze2d-large-dense-v1.hdf5" in out
    assert "run `python benchmarks/make_datasets.py --robot hopper`" in out
    assert sorted(os.listdir(tmp_path / "o")) == [".lock"]  # no run, log, job or settings file


def test_a_failing_job_is_retried_once_then_reported_with_its_log_s_last_lines(tmp_path):
    (tmp_path / "minari" / "test" / "broken-v0").mkdir(parents=True)  # there, so not missing; ilq_jax.py cannot read it
    code, out = _tables(tmp_path, "--tasks", "test/broken-v0", "--num-seeds", "2", "--out", str(tmp_path / "o"), "--", *TINY)
    assert code == 1, out[-3000:]
    log = tmp_path / "o" / "logs" / "test_broken-v0.log"
    assert f"test/broken-v0: failed (exit code 2): retrying once; log {log}" in out
    assert f"test/broken-v0: failed again (exit code 2); log {log}, its last lines:\n    [paper_tables] " in out
    assert out.count("    error: Minari dataset 'test/broken-v0' is not on disk") == 2  # both attempts, from the log
    assert (
        "| test/broken-v0 | — | — | — | 0 of 40 | failed (log: logs/test_broken-v0.log) |"
        in (tmp_path / "o" / "table_other.md").read_text()
    )


def test_bad_flags_are_refused_in_one_paragraph(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pt.parse(["--tasks", "hoper-medium,ilq-local/hopper/random-v0", "--methods", "ilq,nope", "--out", str(tmp_path),
                  "--", "--num-seeds", "3", "--total-steps", "40"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and err.endswith("Nothing was started.\n")
    assert "'hoper-medium', neither a D4RL name" in err and "--methods names 'nope'" in err
    assert "--num-seeds after -- is this script's to set: give --num-seeds" in err


def test_the_slurm_parameters_come_from_the_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in ("sbatch", "srun") else None)
    flags = ["--tasks", "hopper-medium", "--out", str(tmp_path), "--partition", "gpu", "--account", "lab"]
    flags += ["--time-limit-min", "240", "--gpus-per-job", "2", "--requeues", "4", "--slurm", "qos=high"]
    flags += ["--slurm", "cpus_per_task=8", "--slurm", 'additional_parameters={"mail-type": "END"}']
    a = pt.parse(flags)
    assert a.executor == "slurm" and a.max_parallel == 1  # auto: sbatch is there; all jobs at once (one dataset)
    ex = pt.make_executor(a)
    assert isinstance(ex, pt.submitit.SlurmExecutor) and ex.max_num_timeout == 4
    assert {k: ex.parameters[k] for k in ("partition", "account", "time", "gpus_per_node", "qos", "cpus_per_task")} == dict(
        partition="gpu", account="lab", time=240, gpus_per_node=2, qos="high", cpus_per_task=8
    )
    script = ex._make_submission_file_text("python -u -m submitit.core._submit DIR", "uid")  # what sbatch would be given
    for line in ("--partition=gpu", "--account=lab", "--time=240", "--gpus-per-node=2", "--qos=high", "--cpus-per-task=8",
                 "--mail-type=END", "--signal=USR2@90"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, script
    with pytest.raises(SystemExit):
        pt.make_executor(pt.parse(["--tasks", "hopper-medium", "--out", str(tmp_path), "--slurm", "colour=blue"]))


def test_the_paper_numbers_add_up_to_its_printed_totals():
    assert len(pt.PAPER) == 20 and set(pt.PAPER) == set(pt.TABLE_1 + pt.MAZE2D + pt.ADROIT)
    printed = {label: total for spec in pt.TABLES.values() for label, _, total in spec["totals"]}
    assert printed == {"total (12 datasets)": 920.4, "total without random (9 datasets)": 835.5, "Maze2D total": 860.8,
                       "Adroit total": 162.9}  # fmt: skip
    for spec in pt.TABLES.values():
        for label, tasks, total in spec["totals"]:
            assert round(sum(pt.PAPER[t][0] for t in tasks), 1) == total, label


def _summary(scores: dict) -> dict:
    """A finished run's summary.json, as much of it as the tables read: method -> per-seed final scores."""
    methods = {}
    for m, per_seed in scores.items():
        seeds = [dict(final_normalized_score=s, normalized_scores=[s / 2, s]) for s in per_seed]
        methods[m] = dict(final_normalized_score=sum(per_seed) / 2, final_normalized_score_std=1.0, seeds=seeds)
    return dict(methods=methods, eval_steps=[500, 1000], updates=1000, args=dict(total_steps=1000))


def test_table_1_with_ablations_has_their_columns_totals_over_finished_rows_and_ilq_s_probability_of_improvement(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(pt, "BOOTSTRAP_REPS", 100)
    methods = ("ilq", "no-imagination", "no-limitation")
    states = {t: dict(state="waiting", updates=0) for t in pt.TABLE_1}
    states["hopper-medium"] = dict(state="done", updates=1000, summary=_summary(dict(ilq=[90, 94], **{
        "no-imagination": [80, 84], "no-limitation": [70, 74]})))  # fmt: skip
    states["walker2d-medium"] = dict(state="done", updates=1000, summary=_summary(dict(ilq=[91, 93], **{
        "no-imagination": [60, 64], "no-limitation": [92, 96]})))  # fmt: skip
    states["hopper-random"] = dict(state="running", updates=500)
    states["walker2d-random"] = dict(state="failed", updates=0, log="logs/walker2d-random.log")
    written = pt.write_tables(str(tmp_path), list(pt.TABLE_1), states, methods, 2, 1000)
    assert written == [str(tmp_path / "table1.md")]
    lines = (tmp_path / "table1.md").read_text().splitlines()
    row = lambda *cells: "| " + " | ".join(cells) + " |"
    ablations = ("w/o imagination (ours)", "w/o limitation (ours)")
    assert row("dataset", "ILQ (ours)", "paper's ILQ", "ours − paper", "updates", *ablations, "state") in lines
    assert (
        row("hopper-medium", "92.0 ± 1.0", "92.1 ± 5.8", "-0.1", "1000 of 1000", "82.0 ± 1.0", "72.0 ± 1.0", "done") in lines
    )
    assert row("hopper-random", "—", "31.6 ± 0.2", "—", "500 of 1000", "—", "—", "running (update 500)") in lines
    assert (
        row("walker2d-random", "—", "21.6 ± 0.1", "—", "0 of 1000", "—", "—", "failed (log: logs/walker2d-random.log)")
        in lines
    )
    total = "184.0 (2 of 12 datasets finished)", "920.4 (the same 2: 183.6)", "+0.4", "", "144.0", "166.0", ""
    assert row("**total (12 datasets)**", *total) in lines
    total = "184.0 (2 of 9 datasets finished)", "835.5 (the same 2: 183.6)", "+0.4", "", "144.0", "166.0", ""
    assert row("**total without random (9 datasets)**", *total) in lines
    text = "\n".join(lines)
    assert re.search(
        r"Probability that ILQ improves on .*: w/o imagination 1\.00 \[\d\.\d\d, \d\.\d\d\]; w/o limitation", text
    )
    agg = json.load(open(tmp_path / "tables.json"))["tables"]["table1"]["aggregate"]
    assert set(agg["iqm"]) == set(methods) and set(agg["ilq_improves_on"]) == {"no-imagination", "no-limitation"}
    assert agg["ilq_improves_on"]["no-imagination"]["point"] == 1.0  # every ILQ seed above every ablation seed
