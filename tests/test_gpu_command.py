"""The prepared GPU command, rehearsed on CPU at a tiny budget: bundle preparation (wheels for Python 3.12,
dataset, pretrained models), then benchmarks/gpu.sh end to end. Without --rehearse it must refuse a CPU at once."""

import os
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
    )
    env.update(kw)
    return env


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
