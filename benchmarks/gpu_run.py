"""The body of benchmarks/gpu.sh (run that, not this): a short speed table, then the paper's protocol in the time left.

1. Speed (benchmarks/speed.py): updates/s of train()'s compiled update for 1 and 1000 updates per host call, fresh
   behaviour samples (the paper) and --behavior-bank, 1 and 8 vmapped seeds, and the protocol batch of 3 methods x
   --seeds seeds in one program.
2. The protocol (benchmarks/protocol.py): ILQ, ILQ w/o imagination and ILQ w/o limitation x --seeds seeds as one
   program on the bundle's dataset with its pretrained models, 10^6 updates per learner or as many as the time left
   allows (--time-box-min: it ends at the first evaluation after the box, as a finished run that says how far it got).
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
            ]
        )
    else:
        sizes = ["--repeats", "3", "--calls", "1,1000", "--seeds", "1,8", "--seed-calls", "1000"]
        speed.main([*sizes, "--protocol-seeds", str(a.seeds), *common])
    speed_s = time.time() - t0
    # the protocol's own box, less writing the outputs (a rehearsal is never boxed: its budget is tiny)
    minutes = 60.0 if a.rehearse else max(1.0, (a.deadline_s - speed_s - 45) / 60)
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
            os.path.join(work, "run"), arcname="protocol-run", filter=lambda ti: None if ti.name.endswith(".msgpack") else ti
        )
    print(f"[gpu] done in {time.time() - t0:.0f}s; wrote {sorted(os.listdir(out))} to {out}")


if __name__ == "__main__":
    main()
