"""A run that can be trusted after any stop: a dead evaluation worker ends the run (and a worker never outlives its
run), a checkpoint cannot be torn, a resume runs on exactly what the run started with, every file read back is
checked against its hash, a second signal never crashes, a run folder in use is refused before pretraining, a cache
that cannot be written costs no run, and a time-boxed run can be continued."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, tiny_args
from test_data import write_d4rl
from test_faults import _signal_on
from test_models import tiny_problem

import ilq_jax as ilq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _evaluator(workers: int):
    """An Evaluator whose workers have started (one evaluation done), and a snapshot to submit."""
    info = ilq.DatasetInfo("x", "test", None, "hopper", ilq.gym_env("Hopper-v5"), None, None, 11, 3, np.zeros(1), "f")
    cfg = ilq.ILQConfig.for_task(None, 11, 3, 100, hidden_dim=16)
    params = jax.vmap(lambda k: ilq.init_train_state(cfg, k).actor.params)(jnp.stack([jax.random.PRNGKey(1)]))
    ev = ilq.Evaluator(info, cfg, 1, 2, workers, "runs/r")
    ev.submit(0, params, [0, 1], None)
    assert ev.ready(wait=True)[0][1].shape == (1, 2)
    return ev, params


def test_a_dead_evaluation_worker_ends_the_wait_at_once_saying_how_to_resume():
    ev, params = _evaluator(1)
    (worker,) = multiprocessing.active_children()
    worker.kill()  # the OOM killer, kill -9
    worker.join()
    t0 = time.time()
    with pytest.raises(ilq.ILQError, match=r"worker process died.*--resume runs/r --eval-workers 0"):
        ev.submit(10, params, [0, 1], None)
        ev.ready(wait=True)
    ev.close()
    assert time.time() - t0 < 20


WORKER_ORPHAN = r"""
import multiprocessing, os, sys, signal
sys.path.insert(0, sys.argv[1])
from test_stops import _evaluator
ev, _ = _evaluator(1)
print(multiprocessing.active_children()[0].pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the training process killed with kill -9
"""


def test_a_worker_ends_when_its_training_process_is_killed():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", WORKER_ORPHAN, here], capture_output=True, text=True, timeout=120, env=env)
    pid = int(out.stdout.split()[0])
    for _ in range(120):  # it notices within a second once it runs (it may still be starting)
        try:
            state = open(f"/proc/{pid}/stat").read().split(")")[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # ended, waiting for init to reap it
            break
        time.sleep(0.5)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the evaluation worker outlived its training process")


def test_a_checkpoint_that_fails_to_be_written_leaves_the_previous_one_and_resume_equals_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    full = ilq.train(tiny_args(tmp_path, run_name="full", checkpoint_interval=20))
    real, writes = ilq._atomic_write, []

    def full_disk_on_the_second_checkpoint(path, payload):
        writes.append(path)
        if path.endswith(ilq.CHECKPOINT) and sum(p.endswith(ilq.CHECKPOINT) for p in writes) == 2:
            real(path + ".tmp-part", payload[: len(payload) // 2])  # what a kill mid-write leaves beside it
            raise OSError(28, "No space left on device")
        real(path, payload)

    monkeypatch.setattr(ilq, "_atomic_write", full_disk_on_the_second_checkpoint)
    with pytest.raises(ilq.ILQError, match="Could not write a checkpoint.*No space left"):
        ilq.train(tiny_args(tmp_path, run_name="cut", checkpoint_interval=20))
    monkeypatch.setattr(ilq, "_atomic_write", real)
    assert ilq.read_checkpoint(tmp_path / "runs" / "cut")[0]["updates"] == 0  # the one before: whole
    resumed = ilq.train(ilq.Args(resume=str(tmp_path / "runs" / "cut")))
    assert resumed["seeds"] == full["seeds"]


def test_a_stopped_run_resumes_on_its_own_models_whatever_the_cache_holds_and_a_replaced_dataset_is_refused(
    tmp_path, monkeypatch
):
    """Issue 37, trap 1: run a stops; run b retrains the cached models with other lengths (the cache entry a came from
    is replaced); a's resume trains on its own copies and equals the uninterrupted run. With a's own copy deleted too,
    the resume trains the model again from a's settings (exact on a CPU) and still equals it. A replaced dataset is
    refused before any model is loaded."""
    monkeypatch.chdir(tmp_path)
    write_d4rl(tmp_path / "h.hdf5", n=400)
    args = tiny_args(tmp_path, env_id="hopper-medium", dataset_path=str(tmp_path / "h.hdf5"), run_name="full")
    full = ilq.train(args)
    for name in ("a", "c"):
        assert ilq.train(dict_replace(args, run_name=name, stop_after=20)) == {}
    run = tmp_path / "runs" / "a"
    inputs = ilq.read_checkpoint(run)[0]["inputs"]
    assert set(inputs) == {"dataset", "dynamics", "behavior"} and len(inputs["dynamics"]["sha256"]) == 64
    assert inputs["dynamics"]["file"] == os.path.join("runs", "a", "models", "dynamics.msgpack")
    cached = inputs["dynamics"]["source"]
    ilq.train(dict_replace(args, run_name="b", dynamics_epochs=2, diffusion_steps=150, stop_after=10))
    assert ilq.sha256(open(cached, "rb").read()) != ilq.read_checkpoint(run)[0]["inputs"]["dynamics"]["sha256"]
    assert ilq.train(ilq.Args(resume=str(run)))["seeds"] == full["seeds"]
    write_d4rl(tmp_path / "h.hdf5", n=401)  # the dataset file replaced: refused before any model is loaded
    with pytest.raises(ilq.ILQError, match=r"the dataset changed since the run started"):
        ilq.train(ilq.Args(resume=str(tmp_path / "runs" / "c")))
    write_d4rl(tmp_path / "h.hdf5", n=400)  # the same file again
    for f in ("dynamics.msgpack", "dynamics.json"):
        os.remove(tmp_path / "runs" / "c" / "models" / f)
    assert ilq.train(ilq.Args(resume=str(tmp_path / "runs" / "c")))["seeds"] == full["seeds"]
    assert full["inputs"]["dataset"]["fingerprint"] == full["dataset"]["fingerprint"]


def dict_replace(args, **kw):
    return ilq.Args(**{**args.__dict__, **kw})


def test_model_files_are_checked_against_their_hashes(tmp_path, capsys):
    data, info, args = tiny_problem(tmp_path / "models")
    ilq.load_or_pretrain(args, data, info)
    d_path = ilq.artifact_path(args, info, "dynamics")
    side_path = os.path.splitext(d_path)[0] + ".json"
    blob, side = bytearray(open(d_path, "rb").read()), json.load(open(side_path))
    blob[-50] ^= 0xFF  # one flipped byte in the weights: same shapes, other numbers
    open(d_path, "wb").write(bytes(blob))
    with pytest.raises(ilq.ILQError, match="damaged .*msgpack_sha256"):
        ilq.load_artifact(d_path, "dynamics", info, "Pass an intact model.")
    capsys.readouterr()
    ilq.load_or_pretrain(args, data, info)  # in the cache: retrained
    assert "[models] dynamics: training" in capsys.readouterr().out
    side = json.load(open(side_path))
    json.dump(dict(side, trained=40), open(side_path, "w"))  # a sidecar edited by hand
    with pytest.raises(ilq.ILQError, match=r"sidecar .* is damaged .*changed since it was written"):
        ilq.load_artifact(d_path, "dynamics", info, "Pass an intact model.")


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, monkeypatch, capsys):
    data, info, args = tiny_problem(tmp_path / "models")

    def read_only(path, payload):
        raise OSError(30, "Read-only file system", path)

    monkeypatch.setattr(ilq, "_atomic_write", read_only)
    (dyn, _, _), (beh, _, _) = ilq.load_or_pretrain(args, data, info)
    out = capsys.readouterr().out
    assert out.count("could not cache the") == 2 and "it is used from memory" in out
    assert isinstance(dyn, ilq.DynamicsModel) and isinstance(beh, ilq.BehaviorModel)


def test_two_ctrl_c_during_the_first_jitted_call_exit_130_without_a_crash(tmp_path):
    argv = [*TINY, "--run-name", "twice", "--model-dir", str(tmp_path / "models")]

    def twice(proc_signal):
        proc_signal(signal.SIGINT)
        time.sleep(0.2)
        proc_signal(signal.SIGINT)

    code, out = _signal_on(tmp_path, argv, "[ilq] 1 learner(s) in one jitted call", twice)
    assert code == 130 and "Segmentation fault" not in out and "Traceback" not in out, out[-3000:]
    assert "SIGINT again: exit code 130" in out


def test_a_run_folder_in_use_is_refused_before_pretraining_and_an_unfinished_pretraining_leaves_none(tmp_path):
    argv = [*TINY, "--diffusion-steps", "20000", "--run-name", "same", "--model-dir", str(tmp_path / "models")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")

    def second_run(proc_signal):  # while the first pretrains, a second with the same --run-name
        t0 = time.time()
        out = subprocess.run([sys.executable, os.path.join(ROOT, "ilq_jax.py"), *argv], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 2 and "already exists" in out.stderr and "[models]" not in out.stdout, out
        assert time.time() - t0 < 60
        proc_signal(signal.SIGINT)

    code, out = _signal_on(tmp_path, argv, "[models] behavior: training", second_run)
    assert code == 130 and not (tmp_path / "runs" / "same").exists(), out[-3000:]


def test_a_time_boxed_run_can_be_continued(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    boxed = ilq.train(tiny_args(tmp_path, run_name="boxed", time_box_min=1e-6))
    assert boxed["updates"] == 20 and boxed["ended_by_time_box"]  # it ends at its first evaluation
    whole = ilq.train(ilq.Args(resume=str(tmp_path / "runs" / "boxed")))  # the box was this invocation's
    assert whole["updates"] == 40 and not whole["ended_by_time_box"] and whole["eval_steps"] == [20, 40]
    with pytest.raises(ilq.ILQError, match="has finished"):
        ilq.train(ilq.Args(resume=str(tmp_path / "runs" / "boxed")))
