"""The body of benchmarks/gpu.sh (run that, not this): a speed table, then the paper's protocol in the time left.

1. Speed (benchmarks/speed.py): updates/s of train()'s compiled update for 1 and 1000 updates per host call, fresh
   behaviour samples (the paper) and --behavior-bank, 1 and 8 vmapped seeds, and the protocol batch of 3 methods x
   --seeds seeds in one program; then that batch up close (benchmarks/batch_study.py): ILQ x 1, 3, 5, 15 seeds in
   the same program, its variants (--bf16-models, sample chunk 1 / 50, matmul precision "highest", XLA command
   buffers off / with loops and GEMM autotuning off, each XLA-flag variant in a process of its own), a profile of one
   call (the 20 most expensive kernels, kernels per update) and evaluation's share (1 and 4 worker processes). The
   speed part stops starting measurements when the protocol would get less than PROTOCOL_MIN_S; what it leaves out,
   its rows say.
2. The protocol (benchmarks/protocol.py): ILQ, ILQ w/o imagination and ILQ w/o limitation x --seeds seeds as one
   program on the bundle's dataset with its pretrained models, 10^6 updates per learner or as many as the time left
   allows, at least PROTOCOL_MIN_S (--time-box-min: it ends at the first evaluation after the box, as a finished run
   that says how far it got).
Writes into --out: speed.md, speed.json, protocol.md, curves.png, summary.json and runs.tar.gz (logs and TensorBoard
files; no checkpoints): at most 8 files, each far below 16 MiB.
"""

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import protocol  # noqa: E402
import speed  # noqa: E402

PROTOCOL_MIN_S = 240.0  # the protocol's share of --deadline-s, whatever the speed part took
OUTPUTS_S = 45.0  # writing the outputs after the protocol


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--deadline-s", type=float, default=480.0, help="wall time of this script, all included")
    p.add_argument("--seeds", type=int, default=5, help="seeds per method in the protocol")
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
        "--title",
        "Speed on the GPU",
        "--out-md",
    ]
    common += [os.path.join(out, "speed.md"), "--json", os.path.join(out, "speed.json")]
    study = ["--batch-study", "--eval-interval", "5000"]  # the protocol's evaluation interval at the paper's budget
    if a.rehearse:
        speed.main(
            [
                "--repeats",
                "1",
                "--calls",
                "10",
                "--seeds",
                "1",
                "--seed-calls",
                "10",
                "--tiny",
                "--protocol-seeds",
                "2",
                *common,
                *study,
                *["--scaling", "1,6", "--profile-calls", "10", "--eval-workers", "1,2", "--eval-episodes", "2"],
                *["--eval-steps", "50", "--compile-threads", "2", "--xla-runs-at-once", "3"],
            ]
        )
    else:
        sizes = ["--repeats", "3", "--calls", "1,1000", "--seeds", "1,8", "--seed-calls", "1000"]
        budget = a.deadline_s - PROTOCOL_MIN_S - OUTPUTS_S - (time.time() - t0)
        study += ["--scaling", "1,3,5,15", "--study-calls", "200", "--profile-calls", "20", "--eval-workers", "1,4"]
        study += ["--compile-threads", "4"]  # the study's calls are shorter than the table's: more of it fits the box
        speed.main([*sizes, "--protocol-seeds", str(a.seeds), *common, *study, "--budget-s", f"{budget:.0f}"])
    speed_s = time.time() - t0
    # the protocol's own box, less writing the outputs (a rehearsal is never boxed: its budget is tiny)
    minutes = 60.0 if a.rehearse else max(PROTOCOL_MIN_S / 60, (a.deadline_s - speed_s - OUTPUTS_S) / 60)
    print(f"[gpu] speed table done in {speed_s:.0f}s; protocol on {bundle['dataset']} in {minutes:.1f} min", flush=True)

    work = tempfile.mkdtemp(prefix="ilq-gpu-")  # the run's checkpoints stay here, not in --out
    argv = ["--dataset", bundle["dataset"], "--model-dir", os.path.join(a.bundle, "models"), "--out", work]
    argv += ["--minutes", f"{minutes:.2f}", "--seeds", str(a.seeds)] + (["--rehearse"] if a.rehearse else [])
    argv += ["--dataset-path", os.path.join(a.bundle, bundle["dataset_file"])] if bundle.get("dataset_file") else []
    protocol.main(argv)
    for name in ("protocol.md", "curves.png", "summary.json"):
        shutil.copy(os.path.join(work, name), os.path.join(out, name))
    with tarfile.open(os.path.join(out, "runs.tar.gz"), "w:gz") as tar:
        tar.add(
            os.path.join(work, "runs", "protocol"),
            arcname="protocol-run",
            filter=lambda ti: None if ti.name.endswith(".msgpack") else ti,
        )
    print(f"[gpu] done in {time.time() - t0:.0f}s; wrote {sorted(os.listdir(out))} to {out}")


if __name__ == "__main__":
    main()
