"""Fault traps (issue 20): every way a run, a signal, a dataset file, a download or a pretrained model can go wrong
ends in one clear error or a clean exit, and leaves nothing half-made behind."""

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import types

import h5py
import numpy as np
import pytest
from conftest import TINY
from conftest import tiny_args as _tiny_args
from test_data import write_d4rl
from test_models import tiny_problem

import ilq_jax as ilq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(folder) -> dict:
    """{relative path: bytes} of every file under folder."""
    out = {}
    for d, _, names in os.walk(folder):
        for name in names:
            out[os.path.relpath(os.path.join(d, name), folder)] = open(os.path.join(d, name), "rb").read()
    return out


def _copy(stopped_run, tmp_path):
    shutil.copytree(stopped_run, tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------------------------------
# Settings and run folders
# ------------------------------------------------------------------------------------------------------------------


def test_dataset_path_with_a_non_d4rl_env_id_is_refused():
    with pytest.raises(ilq.ILQError, match=r"--dataset-path \(\S*x\.hdf5\) is read only for a D4RL name") as e:
        ilq.resolve_args(ilq.Args(dataset_path="x.hdf5"))
    assert "--env-id 'ilq-local/hopper/random-v0' is none" in str(e.value)


def test_a_checkpoint_whose_state_does_not_match_its_hash_is_refused_as_damaged(stopped_run, tmp_path):
    run = _copy(stopped_run, tmp_path)
    raw = bytearray((run / "checkpoint.msgpack").read_bytes())
    assert ilq.read_checkpoint(run)[0]["updates"] == 20
    raw[-100] ^= 0xFF  # one flipped byte inside the train state
    (run / "checkpoint.msgpack").write_bytes(bytes(raw))
    before = _files(run)
    with pytest.raises(ilq.ILQError, match=r"checkpoint\.msgpack is damaged \(ValueError: its train state does not match"):
        ilq.train(ilq.Args(resume=str(run)))
    assert _files(run) == before


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda saved: saved.pop("gamma"), "missing --gamma"),
        (lambda saved: saved.update(total_steps="40"), "mistyped --total-steps = '40'"),
        (lambda saved: [saved], "a JSON list, not an object of settings"),
    ],
)
def test_args_json_with_a_missing_or_mistyped_key_is_refused_naming_it(stopped_run, tmp_path, edit, named):
    run = _copy(stopped_run, tmp_path)
    saved = json.loads((run / "args.json").read_text())
    edited = edit(saved)  # a new JSON value, or the settings edited in place
    (run / "args.json").write_text(json.dumps(edited if isinstance(edited, list) else saved))
    before = _files(run)
    with pytest.raises(ilq.ILQError, match=r"args\.json does not hold this version's settings \((.*)\)") as e:
        ilq.train(ilq.Args(resume=str(run)))
    assert named in str(e.value)
    assert _files(run) == before


def test_a_second_process_on_a_locked_run_folder_is_refused(stopped_run, tmp_path):
    run = _copy(stopped_run, tmp_path)
    lock = ilq.lock_run_folder(str(run))  # another ilq_jax.py holds the folder
    try:
        before = _files(run)
        with pytest.raises(ilq.ILQError, match="is in use by another ilq_jax.py process"):
            ilq.train(ilq.Args(resume=str(run)))
        assert _files(run) == before
    finally:
        lock.close()


def test_a_huge_num_seeds_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def never(*a, **k):
        raise AssertionError("pretraining started")

    monkeypatch.setattr(ilq, "load_or_train", never)
    with pytest.raises(ilq.ILQError, match=r"100000 learner\(s\) need about [\d.]+ GiB .* GiB available"):
        ilq.train(_tiny_args(tmp_path, run_name="huge", num_seeds=100_000))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


def test_a_dataset_smaller_than_a_minibatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_d4rl(tmp_path / "ten.hdf5", n=10)  # hopper sizes (11, 3), next_observations: 10 usable transitions
    args = _tiny_args(tmp_path, env_id="hopper-medium-v2", dataset_path=str(tmp_path / "ten.hdf5"), run_name="ten")
    with pytest.raises(ilq.ILQError, match=r"has 10 usable transitions, fewer than a minibatch \(32\)"):
        ilq.train(args)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


# ------------------------------------------------------------------------------------------------------------------
# Signals, in a real process
# ------------------------------------------------------------------------------------------------------------------


def _signal_on(tmp_path, argv, marker, signum, timeout=600):
    """`python ilq_jax.py ARGV` in tmp_path, sent signum once marker appears in its output (or signum(send) called);
    (exit code, output)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "ilq_jax.py"), *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, seen = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen.set()
        seen.set()  # the output ended without the marker

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        seen.wait(timeout)
        if proc.poll() is None and any(marker in line for line in lines):
            signum(proc.send_signal) if callable(signum) else proc.send_signal(signum)  # a callable sends its own
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(30)
    out = "".join(lines)
    assert marker in out, out[-3000:]
    return code, out


def test_sigterm_checkpoints_exits_143_and_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = [*TINY, "--total-steps", "400", "--updates-per-call", "10", "--eval-interval", "200"]
    flags += ["--model-dir", str(tmp_path / "models")]
    full = ilq.train(ilq.parse_args([*flags, "--run-name", "full"]))
    assert full["eval_steps"] == [200, 400]
    code, out = _signal_on(tmp_path, [*flags, "--run-name", "cut"], "[ilq] 1 learner(s)", signal.SIGTERM)
    assert code == 143, out[-3000:]
    assert re.search(r"\[ilq\] interrupted at update \d+; checkpoint saved", out) and "Traceback" not in out
    assert "[ilq] interrupted (SIGTERM); exit code 143" in out
    cut = tmp_path / "runs" / "cut"
    assert 0 < ilq.read_checkpoint(cut)[0]["updates"] < 400 and not (cut / "summary.json").exists()
    ilq.main(["--resume", str(cut)])
    resumed = json.load(open(cut / "summary.json"))
    assert resumed["seeds"] == full["seeds"]
    assert ilq.read_checkpoint(cut)[1] == ilq.read_checkpoint(tmp_path / "runs" / "full")[1]  # the train states


def test_ctrl_c_during_pretraining_three_times_exits_130_and_keeps_only_the_trained_dynamics(tmp_path):
    argv = [*TINY, "--diffusion-steps", "20000", "--run-name", "pre", "--model-dir", str(tmp_path / "models")]
    for attempt in range(3):
        code, out = _signal_on(tmp_path, argv, "[models] behavior: training", signal.SIGINT)
        assert code == 130, f"attempt {attempt}: exit code {code}\n{out[-3000:]}"
        assert "[ilq] interrupted (SIGINT); exit code 130" in out and "Traceback" not in out
        assert os.listdir(tmp_path / "runs") == []  # no run folder before training starts (runs/ itself stays)
        cached = sorted(os.path.basename(f) for f in _files(tmp_path / "models"))
        assert [f.split("-")[0] for f in cached] == ["dynamics", "dynamics"], cached  # its .msgpack and .json
        assert ("[models] dynamics: loaded" in out) == (attempt > 0)


# ------------------------------------------------------------------------------------------------------------------
# Pretrained models
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, lr", [("dynamics", "dynamics_lr"), ("behavior", "diffusion_lr")])
def test_a_diverged_model_is_refused_and_never_cached(tmp_path, kind, lr):
    data, info, args = tiny_problem(tmp_path / "models", **{lr: 1e30})
    with pytest.raises(
        ilq.ILQError, match=rf"The {kind} model's training diverged \(.*(nan|inf).*\).*--{lr.replace('_', '-')}"
    ):
        ilq.load_or_pretrain(args, data, info)
    cached = [os.path.basename(f) for f in _files(tmp_path / "models")] if (tmp_path / "models").exists() else []
    assert not [f for f in cached if f.startswith(kind)], cached
    if kind == "behavior":  # the dynamics model trained well and stays cached
        assert sorted(f.split("-")[0] for f in cached) == ["dynamics", "dynamics"], cached


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.json"
    target.write_bytes(b"old")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ilq.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ilq._atomic_write(str(target), b"new")
    assert os.listdir(tmp_path) == ["checkpoint.json"] and target.read_bytes() == b"old"


# ------------------------------------------------------------------------------------------------------------------
# D4RL files
# ------------------------------------------------------------------------------------------------------------------


def _load(**kw):
    return ilq.load_dataset(ilq.Args(**{"env_id": "hopper-medium", **kw}))


@pytest.mark.parametrize("key", ["rewards", "terminals", "timeouts"])
def test_per_transition_arrays_with_two_columns_are_refused_naming_the_key_and_its_shape(tmp_path, key):
    raw = write_d4rl(tmp_path / "ok.hdf5")
    write_d4rl(tmp_path / "wide.hdf5", **{key: np.stack([raw[key], raw[key]], 1)})
    with pytest.raises(ilq.ILQError, match=rf"`{key}` has shape \(12, 2\), but .* one value per transition"):
        _load(dataset_path=str(tmp_path / "wide.hdf5"))


def test_a_directory_is_called_a_directory_not_a_corrupt_file(tmp_path):
    os.mkdir(tmp_path / "hopper.hdf5")
    with pytest.raises(ilq.ILQError, match="is a directory, not a regular file") as e:
        _load(dataset_path=str(tmp_path / "hopper.hdf5"))
    assert "truncated or corrupt" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000")
def test_an_unreadable_file_is_called_unreadable_not_corrupt(tmp_path):
    write_d4rl(tmp_path / "h.hdf5")
    os.chmod(tmp_path / "h.hdf5", 0)
    try:
        with pytest.raises(ilq.ILQError, match=r"cannot be read \(PermissionError") as e:
            _load(dataset_path=str(tmp_path / "h.hdf5"))
        assert "truncated or corrupt" not in str(e.value)
    finally:
        os.chmod(tmp_path / "h.hdf5", 0o644)


def test_a_file_whose_rows_are_all_dropped_says_why(tmp_path):
    n = 12
    write_d4rl(tmp_path / "h.hdf5", next_obs=False, terminals=np.zeros(n, bool), timeouts=np.ones(n, bool))
    with pytest.raises(ilq.ILQError, match=r"all its 12 rows were dropped because their successors are unknown") as e:
        _load(dataset_path=str(tmp_path / "h.hdf5"))
    assert "no next_observations" in str(e.value) and "timeout" in str(e.value)


def test_a_damaged_locally_made_file_is_never_to_be_downloaded_again(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    path = tmp_path / ilq.d4rl_source("hopper-medium", None)[1]  # where a D4RL download would be
    write_d4rl(path, actions=np.zeros((11, 3), np.float32))  # one row short: inconsistent
    with h5py.File(path, "a") as f:
        f.attrs["ilq_local_description"] = "12 steps of a test policy. Locally generated by ilq-jax; NOT a D4RL dataset."
    with pytest.raises(ilq.ILQError, match="is inconsistent") as e:
        _load(download=False)
    assert "download" not in str(e.value).lower() and "benchmarks/make_datasets.py" in str(e.value)


# ------------------------------------------------------------------------------------------------------------------
# The D4RL download, from a real HTTP server on 127.0.0.1
# ------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(files: dict, max_requests: int = 3):
    """An HTTP server on 127.0.0.1 (a free port) in a thread: {path: (body, the Content-Length it announces)}, at most
    max_requests requests answered; stopped on exit. Yields (base URL, the paths requested)."""
    requested = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            if len(requested) > max_requests or self.path not in files:
                self.send_error(503 if len(requested) > max_requests else 404)
                return
            body, length = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)  # then the connection closes (HTTP/1.0), short of `length` if body is

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.1), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert not thread.is_alive()


def _local_d4rl(monkeypatch, tmp_path, base):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ilq, "D4RL_URL", base)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))


PATH = "/gym_mujoco_v2/hopper_medium-v2.hdf5"  # d4rl_source("hopper-medium", "v2") under D4RL_URL


def test_the_d4rl_download_shows_progress_and_loads(tmp_path, monkeypatch, capsys):
    assert ilq.d4rl_source("hopper-medium", "v2")[1] == os.path.basename(PATH)
    write_d4rl(tmp_path / "src.hdf5", n=25_000)  # about 2.7 MiB: three chunks
    blob = (tmp_path / "src.hdf5").read_bytes()
    monkeypatch.setattr(ilq, "PROGRESS_EVERY_S", 0.0)
    with serve({PATH: (blob, len(blob))}) as (base, requested):
        _local_d4rl(monkeypatch, tmp_path, base)
        data, info = ilq.load_dataset(ilq.Args(env_id="hopper-medium-v2"))
    assert requested == [PATH]
    dest = tmp_path / "d4rl" / os.path.basename(PATH)
    assert os.listdir(tmp_path / "d4rl") == [dest.name] and dest.read_bytes() == blob  # no .part left
    assert data.observations.shape == (25_000, 11) and info.source == f"D4RL HDF5 {dest}"
    total = f"{len(blob) / 2**20:.1f} MiB"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[data] downloaded")]
    assert len(lines) == 4, lines  # one a chunk, then the end
    for line, done in zip(lines, ("1.0", "2.0", total.split()[0])):
        assert re.fullmatch(rf"\[data\] downloaded {done} MiB of {total} \(\d+ %\) \| [\d.]+ MiB/s \| time left \d+s", line)
    assert re.fullmatch(rf"\[data\] downloaded {total} in \d+s", lines[-1])


def test_a_download_cut_short_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    write_d4rl(tmp_path / "src.hdf5", n=2_000)
    blob = (tmp_path / "src.hdf5").read_bytes()
    with serve({PATH: (blob[: len(blob) // 2], len(blob))}) as (base, requested):  # the server closes mid-file
        _local_d4rl(monkeypatch, tmp_path, base)
        with pytest.raises(
            ilq.ILQError,
            match=rf"Could not download http://127\.0\.0\.1:\d+{PATH} \(ConnectionError: the connection ended after "
            rf"{len(blob) // 2} of the {len(blob)} bytes announced\)\. .*--dataset-path",
        ):
            ilq.load_dataset(ilq.Args(env_id="hopper-medium-v2"))
    assert requested == [PATH]
    assert os.listdir(tmp_path / "d4rl") == []  # neither the .part nor the final file


# ------------------------------------------------------------------------------------------------------------------
# Issue 28: the Minari folder, signals while generating, dataset files, memory, seeds
# ------------------------------------------------------------------------------------------------------------------


def test_a_minari_folder_that_cannot_be_written_is_named_not_called_damaged(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")  # below a regular file the folder cannot be made, not even by root
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "file" / "minari"))
    with pytest.raises(ilq.ILQError, match=r"The Minari folder .*/file/minari cannot be made \(Not a directory\)") as e:
        ilq.load_dataset(ilq.Args(random_dataset_steps=300))
    assert "MINARI_DATASETS_PATH" in str(e.value) and "damaged" not in str(e.value)
    os.mkdir(tmp_path / "ro")  # an existing folder this user may not write (root may write any: os.access is faked)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "ro"))
    monkeypatch.setattr(ilq.os, "access", lambda path, mode: not str(path).startswith(str(tmp_path / "ro")))
    with pytest.raises(ilq.ILQError, match=r"The Minari folder .*/ro is read-only, so '.*random-300steps-v0' cannot be"):
        ilq.load_dataset(ilq.Args(random_dataset_steps=300))
    assert os.listdir(tmp_path / "ro") == []


def test_sigterm_while_generating_the_dataset_exits_143_and_leaves_no_partial_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    code, out = _signal_on(tmp_path, ["--random-dataset-steps", "200000"], "[data] generating", signal.SIGTERM)
    assert code == 143, out[-3000:]
    assert out.split("[data] generating")[1].splitlines()[1:] == ["[ilq] interrupted (SIGTERM); exit code 143"], out
    assert os.listdir(tmp_path / "minari") == []  # neither Minari's tmpXXXX folder nor a partial dataset


def test_rewards_stored_as_byte_strings_are_refused_naming_the_key_and_its_dtype(tmp_path):
    write_d4rl(tmp_path / "h.hdf5", rewards=np.array([b"high"] * 12))
    with pytest.raises(ilq.ILQError, match=r"`rewards` has dtype \|S4; every array must hold numbers"):
        _load(dataset_path=str(tmp_path / "h.hdf5"))


@contextlib.contextmanager
def _alarm(seconds: int):
    """A TimeoutError after seconds, even inside a blocking open() (SIGALRM interrupts it)."""

    def timeout(signum, frame):
        raise TimeoutError(f"still waiting after {seconds}s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("special", ["fifo", "/dev/null"])
def test_a_fifo_or_a_device_is_refused_at_once_as_not_a_regular_file(tmp_path, special):
    path = str(tmp_path / "h.hdf5") if special == "fifo" else special
    if special == "fifo":
        os.mkfifo(path)  # open() would wait for a writer forever
    with _alarm(20), pytest.raises(ilq.ILQError, match=rf"'{path}' is a special file .*, not a regular file"):
        _load(dataset_path=path)


def test_memory_check_caps_the_sample_chunk_at_the_call_and_names_the_flag_to_lower(monkeypatch):
    args = ilq.Args(sample_chunk=100_000, updates_per_call=250, hidden_dim=256, batch_size=256)
    cfg = ilq.ILQConfig.for_task(None, 11, 3, 1000, batch_size=256, num_behavior_samples=10, hidden_dim=256)
    info = types.SimpleNamespace(obs_dim=11, act_dim=3, family="hopper")
    gib = {}
    monkeypatch.setattr(ilq.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 2**20, "SC_AVPHYS_PAGES": gib["free"] * 1024}[name])
    gib["free"] = 64  # 250 updates' behaviour samples fit; 100 000 would not (about 1953 GiB)
    assert ilq.memory_check(cfg, args, info, 10_000, 1) > 0
    gib["free"] = 1
    with pytest.raises(ilq.ILQError, match=r"largest share is the behaviour samples of 250 update\(s\) drawn at once") as e:
        ilq.memory_check(cfg, args, info, 10_000, 1)
    assert "use a smaller --sample-chunk (100000)" in str(e.value)


@pytest.mark.parametrize("name", ["seed", "eval_seed", "pretrain_seed"])
def test_a_seed_above_2_31_is_refused_naming_its_flag(name):
    ilq.resolve_args(ilq.Args(**{name: ilq.MAX_INT}))
    with pytest.raises(ilq.ILQError, match=rf"^{ilq.flag(name)} \(4294967297\) must lie in 0\.\.2147483647") as e:
        ilq.resolve_args(ilq.Args(**{name: 2**32 + 1}))  # with 32-bit keys the same learner as 1
    assert str(e.value).count("--") == 1
