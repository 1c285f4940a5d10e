"""The third fault probe's traps (issue 37), each fixed at its mechanism: float flags that must be finite, names that
must stay one folder under runs/, args.json values checked by their flag's type, a summary.json that never blocks a
resume, the models' own settings on record, a Q(data) curve independent of how updates were split into calls,
terminals and timeouts that must be 0/1, the three messages that pointed the wrong way, and a killed resource
tracker that harms nothing. (Trap 1, the model cache, is in test_stops.py; trap 7, the parent folder, in
test_faults.py.)"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TINY, tiny_args
from test_data import write_d4rl

import ilq_jax as ilq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e30])
def test_a_delta_that_is_not_a_small_finite_number_is_refused_before_any_folder(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    with pytest.raises(ilq.ILQError, match=r"--delta \(\S+\) must be finite and at most 1e6"):
        ilq.train(tiny_args(tmp_path, delta=value))
    assert time.time() - t0 < 5 and os.listdir(tmp_path) == []


@pytest.mark.parametrize("names", [dict(run_name="a/../../escape"), dict(run_name="../keep/G"), dict(exp_name="../../x")])
def test_run_and_experiment_names_are_one_folder_name(names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").mkdir()
    with pytest.raises(ilq.ILQError, match=rf"{ilq.flag(next(iter(names)))} .* must be one folder name"):
        ilq.train(tiny_args(tmp_path, **names))
    assert os.listdir(tmp_path) == ["keep"] and os.listdir(tmp_path / "keep") == []


@pytest.mark.parametrize(
    "edit, named",
    [
        (dict(eta="0.8"), "--eta = '0.8'"),
        (dict(methods=5), "--methods = 5"),
        (dict(eval_workers="1"), "--eval-workers = '1'"),
        (dict(total_steps=True), "--total-steps = True"),
        (dict(budget="gpu"), "--budget = 'gpu'"),
    ],
)
def test_args_json_values_are_checked_by_their_flags_type(stopped_run, tmp_path, edit, named):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**saved, **edit}))
    with pytest.raises(ilq.ILQError, match=r"does not hold this version's settings \(mistyped") as e:
        ilq.train(ilq.Args(resume=str(run)))
    assert named in str(e.value)


def test_an_edited_total_steps_below_the_updates_done_is_refused(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps(dict(saved, total_steps=10)))  # the checkpoint has done 20
    with pytest.raises(ilq.ILQError, match=r"asks for 10 updates, fewer than the 20 its checkpoint has done"):
        ilq.train(ilq.Args(resume=str(run)))
    assert not (run / "summary.json").exists()


def test_a_malformed_summary_never_blocks_a_resume_and_a_finished_runs_is_written_again(stopped_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, payload in enumerate([b"{}", b"[1]", b'{"updates": 4']):
        run = tmp_path / f"run{i}"
        shutil.copytree(stopped_run, run)
        (run / "summary.json").write_bytes(payload)  # a stopped run has none: one edited or left by hand
        summary = ilq.train(ilq.Args(resume=str(run)))
        assert summary["updates"] == 40
    (run / "summary.json").write_bytes(b'{"updates": 4')  # a finished run's summary truncated: only a record
    again = ilq.train(ilq.Args(resume=str(run)))
    assert again["seeds"] == summary["seeds"] and json.load(open(run / "summary.json"))["updates"] == 40
    with pytest.raises(ilq.ILQError, match="the run has finished; its results are in .*--evaluate"):
        ilq.train(ilq.Args(resume=str(run)))


def test_given_models_are_recorded_with_their_own_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = tiny_args(tmp_path, dynamics_members=3, dynamics_elites=2, diffusion_k=2)
    data, info = ilq.load_dataset(ilq.resolve_args(small))
    (_, _, dyn_path), (_, _, beh_path) = ilq.load_or_pretrain(ilq.resolve_args(small), data, info)
    capsys.readouterr()
    summary = ilq.train(tiny_args(tmp_path, run_name="given", dynamics_path=dyn_path, behavior_path=beh_path))
    out = capsys.readouterr().out
    assert "members 3, elites 2" in out and "K 2, hidden" in out  # the console says what is used, not the flags' 7 / 5
    models = summary["inputs"]
    assert (models["dynamics"]["config"]["members"], models["dynamics"]["config"]["elites"]) == (3, 2)
    assert models["behavior"]["config"]["K"] == 2 and models["dynamics"]["source"] == dyn_path


def test_the_q_data_curve_does_not_depend_on_how_updates_were_split_into_calls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    whole = ilq.train(tiny_args(tmp_path, run_name="whole", updates_per_call=20))
    assert ilq.train(tiny_args(tmp_path, run_name="cut", updates_per_call=7, stop_after=15)) == {}
    resumed = ilq.train(ilq.Args(resume=str(tmp_path / "runs" / "cut")))
    assert resumed["seeds"][0]["q_data"] == whole["seeds"][0]["q_data"]  # the mean over the updates since the last one
    assert resumed["seeds"] == whole["seeds"]


@pytest.mark.parametrize("key, value", [("terminals", 0.3), ("timeouts", -1.0)])
def test_terminals_and_timeouts_must_be_zero_or_one(tmp_path, key, value):
    raw = write_d4rl(tmp_path / "ok.hdf5")
    write_d4rl(tmp_path / "odd.hdf5", **{key: np.where(raw[key], value, 0.0)})
    with pytest.raises(ilq.ILQError, match=rf"\['{key}'\] must hold 0/1"):
        ilq.load_dataset(ilq.Args(env_id="hopper-medium", dataset_path=str(tmp_path / "odd.hdf5")))


def test_the_messages_say_what_happened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # two runs started at the same instant with one --run-name: the second is told so, not to free disk space
    real = ilq.memory_check
    monkeypatch.setattr(ilq, "memory_check", lambda *a: os.makedirs("runs/same") or real(*a))
    with pytest.raises(ilq.ILQError, match=r"Run folder runs/same already exists; pick another --run-name"):
        ilq.train(tiny_args(tmp_path, run_name="same"))
    monkeypatch.setattr(ilq, "memory_check", real)
    # --plot on a summary of another shape names the summary, not matplotlib
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps(dict(eval_steps=[1], methods={})))
    with pytest.raises(ilq.ILQError, match=r"Could not draw .* from .*summary\.json .*not a summary\.json of this version"):
        ilq.redraw_curves(str(tmp_path / "old"))
    # a run started with a relative --dataset-path resumes from another folder
    write_d4rl(tmp_path / "h.hdf5", n=400)
    assert ilq.train(tiny_args(tmp_path, env_id="hopper-medium", dataset_path="h.hdf5", run_name="rel", stop_after=20)) == {}
    monkeypatch.chdir(tmp_path / "old")
    assert ilq.train(ilq.Args(resume=str(tmp_path / "runs" / "rel")))["updates"] == 40


def _children(pid: int) -> list:
    return [int(c) for t in os.listdir(f"/proc/{pid}/task") for c in open(f"/proc/{pid}/task/{t}/children").read().split()]


def test_a_killed_resource_tracker_harms_no_run(tmp_path):
    """kill -9 to the run's multiprocessing resource tracker (not a worker) after its first evaluation: the run ends
    normally (exit 0, no traceback) with the returns of a run whose evaluation worker kept its tracker."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    argv = [sys.executable, os.path.join(ROOT, "ilq_jax.py"), *TINY, "--model-dir", str(tmp_path / "models")]
    argv += ["--eval-workers", "1", "--total-steps", "80"]
    ok = subprocess.run([*argv, "--run-name", "ok"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    proc = subprocess.Popen(
        [*argv, "--run-name", "cut"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, killed = [], []
    for line in proc.stdout:
        lines.append(line)
        if "evaluation at update       20" in line and not killed:
            for pid in _children(proc.pid):
                if "resource_tracker" in open(f"/proc/{pid}/cmdline").read():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
    assert proc.wait(60) == 0 and killed and "Traceback" not in "".join(lines), "".join(lines)[-3000:]
    summaries = [json.load(open(tmp_path / "runs" / name / "summary.json")) for name in ("ok", "cut")]
    assert summaries[0]["seeds"] == summaries[1]["seeds"]
