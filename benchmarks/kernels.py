"""How many kernels, how long a chain of them and how many bytes one ILQ update costs, read from the compiled program.

    python benchmarks/kernels.py                                   # this checkout's ilq_jax.py, paper sizes
    python benchmarks/kernels.py --ilq /tmp/ilq_before.py --label before   # another version of the file
    python benchmarks/kernels.py --out-md benchmarks/RESULTS.md    # (re)write the kernels section

On a GPU, one ILQ learner is bound by the number of kernels it launches one after another and many learners by the
bytes those kernels move (benchmarks/RESULTS.md); FLOPs are not the limit. Both can be read on a CPU-only machine from
XLA's optimised program at the real shapes, as a proxy for XLA:GPU (which fuses similarly, not identically):

- kernel-like ops: the instructions of the compiled program that launch work (fusions, matrix products, copies,
  gathers, reductions, ...), every loop body counted as often as it runs (its known trip count);
- dependency depth: the longest chain of kernel-like ops, each waiting for the one before;
- bytes: XLA's cost analysis ("bytes accessed") of the same program.

JAX's random numbers are lowered as on a GPU (threefry unrolled; XLA:CPU would run it as a loop).

Kernels and depth come from one compiled call of --chunk updates as train() runs it (make_learners_update: the behaviour
samples of the chunk drawn together; every loop counted by its known trip count), bytes from one update with every
lax.scan unrolled (XLA's cost analysis counts a loop body once); all per update. Two programs: one ILQ learner, and the
paper's protocol batch of 3 methods x 5 seeds. Versions of ilq_jax.py before make_learners_update (with
make_update_fn(cfg, batched=True, methods=..., sample_chunk=...)) are measured through that function.
"""

import argparse
import importlib.util
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_KERNELS = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id",
    "opt-barrier", "add-dependency", "domain", "copy-start", "copy-done",
}  # fmt: skip


def gpu_like_threefry() -> None:
    """Lower JAX's threefry as XLA:GPU does (unrolled, one fusible block), not as XLA:CPU's rolled 5-round loop,
    whose loop bodies would count as dozens of kernels per random draw (a private JAX hook, benchmarks only)."""
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32 as threefry

    mlir.register_lowering(threefry.threefry2x32_p, threefry._threefry2x32_lowering_rule, platform="cpu")


def load_ilq(path: str):
    """ilq_jax from a given file (e.g. an older version: `git show REV:ilq_jax.py > /tmp/ilq_before.py`)."""
    spec = importlib.util.spec_from_file_location("ilq_jax", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ilq_jax"] = module
    spec.loader.exec_module(module)
    return module


def parse_hlo(text: str) -> dict:
    """{computation: [(name, opcode, operands, called computations, trip count)]} of an HLO module's text."""
    comps, current = {}, None
    for line in text.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line)  # tuple-index comments (/*index=5*/) hold '='
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = comps.setdefault(("ENTRY " if line.startswith("ENTRY") else "") + head.group(1), [])
            comps.setdefault(head.group(1), current)  # called by its plain name
            continue
        m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = [^=]*? ([a-z][\w\-]*)\((.*)$", line)
        if current is None or not m:
            continue
        name, opcode, rest = m.groups()
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0] if "), " in rest else rest)
        called = dict(re.findall(r"(body|condition|calls|to_apply)=%?([\w.\-]+)", rest))
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        current.append((name, opcode, operands, called, int(trip.group(1)) if trip else 1))
    return comps


def count(comps: dict, comp: str, memo: dict) -> tuple:
    """(kernel-like ops, dependency depth) of one computation, loops expanded by their trip count."""
    if comp in memo:
        return memo[comp]
    kernels, depth = 0, {}
    for name, opcode, operands, called, trip in comps[comp]:
        start = max((depth.get(o, 0) for o in operands), default=0)
        if opcode == "while":  # the body runs trip times (its condition is a scalar compare)
            k, d = count(comps, called["body"], memo)
            kernels, depth[name] = kernels + trip * k, start + trip * d
        elif opcode == "call" and "to_apply" in called:
            k, d = count(comps, called["to_apply"], memo)
            kernels, depth[name] = kernels + k, start + d
        elif opcode in NOT_KERNELS:
            depth[name] = start
        else:
            kernels, depth[name] = kernels + 1, start + 1
    memo[comp] = (kernels, max(depth.values(), default=0))
    return memo[comp]


def program_figures(compiled, updates: int) -> dict:
    comps = parse_hlo(compiled.as_text())
    kernels, depth = count(comps, next(c for c in comps if c.startswith("ENTRY ")), {})
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(kernels=kernels / updates, depth=depth / updates, bytes=cost.get("bytes accessed", float("nan")) / updates)


def measure(ilq, methods, seeds: int, chunk: int, tiny: bool) -> dict:
    """Per-update figures of the compiled batch of len(methods) x seeds learners (paper sizes unless tiny): kernels
    and depth from the program as it runs (one call of `chunk` updates, loops counted by their trip counts), bytes
    from one update with every loop unrolled (XLA's cost analysis counts a loop body once)."""
    import jax
    import speed

    if tiny:
        speed.SIZES.update(speed.TINY_SIZES)
    cfg, frozen, key, _ = speed.build(False)
    n = len(methods) * seeds
    state = jax.vmap(lambda k: ilq.init_train_state(cfg, k))(jax.random.split(key, n))
    keys = jax.random.split(key, n * chunk).reshape(n, chunk, -1)
    programs = [(methods, slice(None))]

    def compiled(ms, block, updates: int, sample_chunk: int):
        sub = jax.tree_util.tree_map(lambda x: x[block], state)
        if hasattr(ilq, "make_learners_update"):
            update = ilq.make_learners_update(cfg, ms, sample_chunk)
            return update.lower(sub, frozen, None, keys[block, :updates]).compile()
        update = ilq.make_update_fn(cfg, batched=True, methods=ms, sample_chunk=sample_chunk)  # an older ilq_jax.py
        return update.lower(sub, frozen, keys[block, :updates]).compile()

    t0, out = time.time(), dict(kernels=0.0, depth=0.0, bytes=0.0)
    for ms, block in programs:  # separate programs (processes) add up their kernels; their depth is the longest
        figures = program_figures(compiled(ms, block, chunk, chunk), chunk)
        with speed.unrolled_scans():
            bytes_one = program_figures(compiled(ms, block, 1, 1), 1)["bytes"]
        out.update(kernels=out["kernels"] + figures["kernels"], depth=max(out["depth"], figures["depth"]))
        out["bytes"] += bytes_one
    out["compile_s"] = time.time() - t0
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ilq", default=os.path.join(ROOT, "ilq_jax.py"), help="the ilq_jax.py to measure")
    p.add_argument("--label", default="this checkout", help="name of that version in the table")
    p.add_argument("--chunk", type=int, default=10, help="updates per compiled call (--sample-chunk)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a rehearsal, not a measurement)")
    p.add_argument("--out-md", default=None, help="append the rows to the kernels section of this Markdown file")
    p.add_argument("--section", default="kernels")
    a = p.parse_args(argv)
    ilq = load_ilq(a.ilq)
    gpu_like_threefry()
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    rows = []
    for name, methods, seeds in (
        ("1 ILQ learner", ("ilq",), 1),
        ("3 methods x 5 seeds", ("ilq", "no-imagination", "no-limitation"), 5),
    ):
        r = measure(ilq, methods, seeds, a.chunk, a.tiny)
        n = len(methods) * seeds
        rows.append(
            f"| {a.label} | {name} | {r['kernels']:.0f} | {r['depth']:.0f} | {r['bytes'] / 1e6:.0f} | "
            f"{r['bytes'] / n / 1e6:.0f} | {r['compile_s']:.0f} |"
        )
        print(rows[-1], flush=True)
    if a.out_md:
        from results_md import command, git_commit, machine, write_section

        header = [
            "## Kernels and bytes per update (XLA's compiled program on CPU, a proxy for XLA:GPU)",
            "",
            f"Machine: {machine()}. Commit {git_commit()}. Command: `{command()}`. Paper sizes (hopper: batch 256, M = 10, "
            f"K = 5, 3 x 256 networks, 7 x 4 x 200 dynamics), fresh behaviour samples, {a.chunk} updates per compiled "
            "call, every scan unrolled; per update." + (" **Tiny sizes: a rehearsal.**" if a.tiny else ""),
            "",
            "| ilq_jax.py | learners | kernel-like ops | dependency depth | MB accessed | MB per learner | compile s |",
            "|---|---|---|---|---|---|---|",
        ]
        old = open(a.out_md).read() if os.path.exists(a.out_md) else ""
        block = re.search(rf"<!-- {a.section}:begin -->\n(.*?)<!-- {a.section}:end -->", old, re.S)
        kept = [ln for ln in (block.group(1).splitlines() if block else []) if ln.startswith("| ") and "---" not in ln]
        kept = [ln for ln in kept if not ln.startswith(f"| {a.label} |") and not ln.startswith("| ilq_jax.py |")]
        write_section(a.out_md, a.section, "\n".join(header + kept + rows))
        print(f"[kernels] wrote the {a.section} section of {a.out_md}")


if __name__ == "__main__":
    main()
