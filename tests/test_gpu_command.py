"""The prepared GPU command, rehearsed on CPU at a tiny budget: bundle preparation (wheels for Python 3.12,
dataset, pretrained models), then benchmarks/gpu.sh end to end, its speed table with the protocol batch up close
(scaling, variants, profile, evaluation's share). Without --rehearse it must refuse a CPU at once."""

import json
import os
import re
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**kw):
    env = dict(
        os.environ,
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        PYTHON=sys.executable,
        JAX_PLATFORMS="cpu",
        # XLA:CPU's older emitters compile the rehearsal's many programs about twice as fast (measured: a 6-learner batch
        # 14 s -> 7 s); the same programs, and a rehearsal's numbers measure nothing
        XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip(),
    )
    env.update(kw)
    return env


def _cells(table: str, start: str) -> list:
    """The cells of the one Markdown table row that starts with `start`."""
    rows = [line for line in table.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def _check_batch_study(speed_md: str, study: dict) -> None:
    """The rehearsal's protocol batch up close: every row there with numbers, the profile from a real trace."""
    for n in (1, 6):  # scaling: ILQ x N seeds in the batch program
        cells = _cells(speed_md, f"| {n} | ILQ x {n} seed")
        assert float(cells[2]) > 0 and float(cells[3]) > 0, cells
    variants = {
        "| `--bf16-models`": True,
        '| `jax_default_matmul_precision="highest"`': True,
        "| `--sample-chunk 1`": False,
        "| `--sample-chunk 50`": False,
        "| XLA command buffers off: `--xla_gpu_enable_command_buffer=`": False,
        "| XLA command buffers extended to loops: `--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL`": False,
        "| GEMM autotuning off: `--xla_gpu_autotune_level=0`": False,
    }
    for start, changes_maths in variants.items():
        cells = _cells(speed_md, start)
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and float(cells[4]) > 0, cells
        assert cells[1].startswith("changes the maths") == changes_maths, cells
    assert "in effect: `--xla_gpu_enable_command_buffer=(none)`" in speed_md  # read back from XLA's dumped options
    assert not study["skipped"] and all("error" not in r for r in study["rows"].values()), study
    for chunk in ("sample-chunk-1", "sample-chunk-50"):  # the same draws: the same first update
        assert study["rows"][chunk]["first_metrics"] <= 1e-5, study["rows"][chunk]

    profile = study["profile"]
    assert profile["kernels"] > 0 and profile["kernels_per_update"] > 0 and len(profile["top"]) == 20, profile
    assert 0 < sum(k["share"] for k in profile["top"]) <= 1.0 + 1e-9 and all(k["launches"] > 0 for k in profile["top"])
    assert "XLA:CPU ops" in profile["kind"] and profile["trace"].endswith(".json.gz")
    per_update = re.search(r"\*\*(\d+) kernels per update\*\*", speed_md)
    assert per_update and int(per_update.group(1)) > 0
    shares = [float(_cells(speed_md, f"| {i} | `")[5].rstrip(" %")) for i in range(1, 21)]
    assert 0 < sum(shares) <= 100.5, shares  # (each share rounded to 0.1 %)

    for workers in (1, 2):  # evaluation rounds in 1 and 2 worker processes, against the training between two
        cells = _cells(speed_md, f"| {workers} | {workers} | ")
        assert float(cells[3]) > 0 and float(cells[4]) > 0, cells


def test_gpu_command_rehearsal_runs_end_to_end(tmp_path):
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    made = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_bundle.sh"), str(bundle), "--rehearse"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    wheels = sorted(os.listdir(bundle / "wheels"))
    for name in ("gymnasium-", "mujoco-", "mujoco_core-", "minari-", "tyro-"):
        assert any(w.startswith(name) for w in wheels), (name, wheels)
    assert all("cp311" not in w for w in wheels)  # built for the GPU machine's Python 3.12, not this one
    assert "total" in made.stdout and (bundle / "bundle.json").exists()

    ran = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), str(out), "--rehearse"],
        env=_env(ILQ_GPU_BUNDLE=str(bundle)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    files = ["curves.png", "log.txt", "protocol.md", "runs.tar.gz", "speed.json", "speed.md", "summary.json"]
    assert sorted(os.listdir(out)) == files  # at most 8 files come back from a GPU machine
    table = (out / "protocol.md").read_text()
    for method in ("| ILQ |", "| ILQ w/o imagination |", "| ILQ w/o limitation |"):
        row = next(line for line in table.splitlines() if line.startswith(method))
        assert " ± " in row, row
    assert "Rehearsal on CPU" in table and "Reading:" in table
    speed_md = (out / "speed.md").read_text()
    assert "seeds N" in speed_md and "3 methods x 2 seeds" in speed_md
    _check_batch_study(speed_md, json.loads((out / "speed.json").read_text())["batch_study"])
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("ilq/seed_1") for n in names) and not any(n.endswith(".msgpack") for n in names)


def test_gpu_command_refuses_a_machine_without_gpu(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    ran = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), str(tmp_path / "out")],
        env=_env(ILQ_GPU_BUNDLE=str(bundle)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode != 0 and "JAX sees no GPU" in ran.stderr
    missing = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), str(tmp_path / "out")],
        env=_env(ILQ_GPU_BUNDLE=str(tmp_path / "nowhere")),
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "gpu_bundle.sh" in missing.stderr


def test_profile_summary_reads_the_device_streams_of_a_gpu_trace():
    """The profile's parser on a GPU-shaped trace (no GPU here): kernels and copies on the device's Stream lines
    count; the derived "XLA Ops" line and the host's events do not; without device lines on an accelerator it finds
    nothing and says so."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import batch_study

    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 101, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    kernels = [("loop_fusion", 3.0)] * 4 + [("gemm", 10.0)] * 2 + [("MemcpyD2H", 1.0)]
    events = [{"ph": "X", "pid": 1, "tid": 7, "ts": 20.0 * i, "dur": d, "name": n} for i, (n, d) in enumerate(kernels)]
    events += [{"ph": "X", "pid": 1, "tid": 101, "ts": 0.0, "dur": 100.0, "name": "fusion.1", "args": {"hlo_op": "fusion.1"}}]
    events += [{"ph": "X", "pid": 701, "tid": 3, "ts": 0.0, "dur": 500.0, "name": "PjitFunction(update_many)"}]
    s = batch_study.summarize_trace({"traceEvents": meta + events}, updates=2, device=True)
    assert s["kernels"] == 7 and s["kernels_per_update"] == 3.5 and s["lines"] == ["/device:GPU:0 / Stream #7(Compute)"]
    assert [(k["name"], k["launches"]) for k in s["top"]] == [("gemm", 2), ("loop_fusion", 4), ("MemcpyD2H", 1)]
    assert abs(sum(k["share"] for k in s["top"]) - 1.0) < 1e-12 and abs(s["kernel_s"] - 33e-6) < 1e-12
    host_only = [e for e in meta + events if e["pid"] != 1]
    empty = batch_study.summarize_trace({"traceEvents": host_only}, updates=2, device=True)
    assert empty["kernels"] == 0 and "no device activity" in empty["kind"]
