"""The paper's protocol batch (3 methods x S seeds as one program, `ilq_jax.make_learners_update(cfg, methods,
sample_chunk=10)`) up close, after speed.py's table (`speed.py --protocol-seeds S --batch-study`; the GPU
command runs it, and its CPU rehearsal in CI):

1. Scaling: N learners = N seeds of ILQ alone in the same batch program (`methods=("ilq",)`, sample chunk 10), N in
   --scaling (the GPU command: 1, 3, 5, 15).
2. Variants of the protocol batch, one change each against the baseline (fresh behaviour samples, sample chunk 10,
   float32 models, JAX's default matmul precision, XLA's default flags): --bf16-models (the models' dtype),
   sample chunk 1 and 50, `jax_default_matmul_precision="highest"` and, each in a process of its own (XLA reads its
   flags once, when JAX starts), XLA:GPU command buffers off / extended to loops and GEMM autotuning off. Each row
   says whether it changes the maths, with the largest absolute difference against the baseline after one call from
   the same state with the same keys.
3. A profile of one call of the baseline (jax.profiler.trace; the Chrome-trace json.gz it writes is parsed here): the
   20 most expensive kernels by device time with their share, and the kernel count per update. On CPU (the rehearsal)
   the trace holds XLA:CPU ops (thunks) instead of GPU kernels, and those are what is summarised.
4. Evaluation's share: seconds per evaluation round (the batch's learners x --eval-episodes episodes) with 1 and 4
   worker processes (ilq_jax.Evaluator), against the training time between two evaluations at the measured speed.

Everything after the speed table runs within speed.py's --budget-s: a part that would not fit is left out, and its row
says so. `python benchmarks/batch_study.py --one ...` is this file's own use: one part-2 variant in a fresh process.
"""

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import NamedTuple, Optional

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import speed  # noqa: E402

import ilq_jax as ilq  # noqa: E402

CHUNK = 10  # the baseline's sample chunk: train()'s --sample-chunk default
COMMAND_BUFFER = "--xla_gpu_enable_command_buffer"  # XLA:GPU: the op types recorded into CUDA graphs ("" = none)
AUTOTUNE = "--xla_gpu_autotune_level"  # XLA:GPU: GEMM/convolution autotuning, 0 = off ... 5
XLA_OPTIONS = {"xla_gpu_enable_command_buffer": COMMAND_BUFFER, "xla_gpu_autotune_level": AUTOTUNE}
SAME = "same maths"
TIME_BOX = "not run: it did not fit the time box (`--budget-s`)"


class Variant(NamedTuple):
    key: str
    label: str  # the row's name
    maths: str = SAME  # what it changes in the numbers, if anything
    methods: tuple = speed.PROTOCOL
    seeds: int = 0  # learners per method (0: the protocol batch's)
    chunk: int = CHUNK
    bf16: bool = False
    precision: Optional[str] = None
    xla_flags: str = ""  # set in a fresh process


def variants(seeds: int, scaling) -> tuple:
    """(scaling rows, in-process variants, XLA-flag variants) in the order they run: what fits the time box first."""
    scale = tuple(Variant(f"ilq-x{n}", f"ILQ x {n} seed{'s' if n > 1 else ''}", methods=("ilq",), seeds=n) for n in scaling)
    inproc = (
        Variant(
            "bf16-models",
            "`--bf16-models`: frozen dynamics and behaviour models computing in bfloat16 (their `dtype`)",
            "changes the maths: the models' weights and activations in bfloat16",
            bf16=True,
        ),
        Variant(
            "precision-highest",
            '`jax_default_matmul_precision="highest"`: float32 matrix products in full float32',
            "changes the maths: the baseline's default lets an NVIDIA GPU multiply float32 in TF32 (10-bit mantissa); "
            "this row does not",
            precision="highest",
        ),
        Variant(
            "sample-chunk-1",
            "`--sample-chunk 1`: behaviour samples drawn inside every update",
            SAME + " (same draws)",
            chunk=1,
        ),
        Variant(
            "sample-chunk-50",
            "`--sample-chunk 50`: 50 updates' behaviour samples in one chain",
            SAME + " (same draws)",
            chunk=50,
        ),
    )
    flags = (
        Variant(
            "command-buffer-off",
            f"XLA command buffers off: `{COMMAND_BUFFER}=` (every kernel launched on its own)",
            SAME + " (how kernels are launched)",
            xla_flags=f"{COMMAND_BUFFER}=",
        ),
        Variant(
            "command-buffer-loops",
            f"XLA command buffers extended to loops: `{COMMAND_BUFFER}=+WHILE,+CONDITIONAL` (lax.scan bodies as CUDA graphs)",
            SAME + " (how kernels are launched)",
            xla_flags=f"{COMMAND_BUFFER}=+WHILE,+CONDITIONAL",
        ),
        Variant(
            "autotune-0",
            f"GEMM autotuning off: `{AUTOTUNE}=0` (the libraries' default algorithms)",
            "same maths; another GEMM algorithm may round differently",
            xla_flags=f"{AUTOTUNE}=0",
        ),
    )
    return tuple(v._replace(seeds=v.seeds or seeds) for v in scale + inproc + flags)


def learners_of(v: Variant) -> int:
    return len(v.methods) * v.seeds


def frozen_for(v: Variant, frozen):
    if not v.bf16:
        return frozen
    bf16 = dict(dtype=jax.numpy.bfloat16)  # as ilq_jax.pretrained_models sets it for --bf16-models
    return frozen._replace(dynamics=frozen.dynamics.replace(**bf16), behavior=frozen.behavior.replace(**bf16))


def lower(v: Variant, cfg, frozen, key, per_call: int):
    """The variant's program for one call of per_call updates, lowered (traced) here, to be compiled anywhere."""
    update = ilq.make_learners_update(cfg, v.methods, sample_chunk=v.chunk)
    state, keys = speed.learner_inputs(cfg, key, learners_of(v), per_call)
    with jax.default_matmul_precision(v.precision) if v.precision else contextlib.nullcontext():
        return update.lower(state, frozen_for(v, frozen), None, keys)


def timed_compile(lowered) -> tuple:
    """(the compiled program, compile seconds); XLA releases the GIL, so several can compile at once in threads."""
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def one_call(compiled, cfg, frozen, key, learners: int, per_call: int):
    """(learners' parameters, metrics) after one call from the fresh state that every timing starts from."""
    state, keys = speed.learner_inputs(cfg, key, learners, per_call)
    state, metrics = compiled(state, frozen, None, keys)
    return jax.device_get((state.actor.params, state.critic.params)), jax.device_get(metrics)


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over all leaves (a NaN in both places counts as equal, in one only as NaN)."""
    worst = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        d = np.abs(x - y)
        d[np.isnan(x) & np.isnan(y)] = 0.0
        worst = max(worst, float(d.max())) if not np.isnan(d).any() else float("nan")
    return worst


def differences(reference, other) -> dict:
    """Max abs differences of one call: the first update's metrics (the same state, before any step diverges) and the
    parameters after the whole call."""
    (p0, m0), (p1, m1) = reference, other
    first = partial(jax.tree_util.tree_map, lambda x: np.asarray(x)[:, 0])
    return dict(first_metrics=max_abs_diff(first(m0), first(m1)), params=max_abs_diff(p0, p1))


# ------------------------------------------------------------------------------------------------ the profile (part 3)
DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "TensorFlow", "Source", "Launch Stats", "XLA TraceMe")
LOOPS = re.compile(r"(while|conditional|call)(\.\d+)?$")  # XLA:CPU ops whose events enclose their bodies' ops


def innermost(events: list) -> list:
    """Events that enclose no other event of their thread (a loop's or call's own event encloses its body's)."""
    by_thread, out = defaultdict(list), []
    for e in events:
        by_thread[(e["pid"], e["tid"])].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        for i, e in enumerate(evs):
            if i + 1 < len(evs) and evs[i + 1]["ts"] < e["ts"] + e["dur"]:
                continue
            out.append(e)
    return out


def kernel_events(trace, device: bool) -> tuple:
    """(what they are, the kernel-like complete events, the trace lines they are on) of a Chrome trace written by
    jax.profiler: on a GPU the events on the device's "Stream" lines (kernels and copies; not the derived lines
    such as "XLA Ops"), else XLA:CPU's ops (thunk events carrying an hlo_op; a loop's own event left out)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    devices = {pid for pid, name in procs.items() if re.search(r"/device:(GPU|TPU)", name, re.I)}
    if devices:
        lines = {k: n for k, n in threads.items() if k[0] in devices}
        streams = {k for k, n in lines.items() if n.lower().startswith("stream")}
        keep = (lambda k: k in streams) if streams else (lambda k: not lines.get(k, "").startswith(DERIVED_LINES))
        picked = [e for e in complete if e["pid"] in devices and keep((e["pid"], e["tid"]))]
        kind = "GPU kernels (and copies) on the device's streams"
    elif device:  # an accelerator, yet no device lines: the profiler could not trace it (on NVIDIA: CUPTI missing?)
        picked, kind = [], "no device activity in the trace (the profiler could not trace the accelerator)"
    else:
        ops = [e for e in complete if "hlo_op" in e.get("args", {}) and not e["name"].startswith("end: ")]
        picked = innermost([e for e in ops if not LOOPS.match(e["name"])])
        kind = "XLA:CPU ops (thunks) on the host's threads: no GPU kernels on this backend"
    lines = sorted({f"{procs.get(e['pid'], e['pid'])} / {threads.get((e['pid'], e['tid']), e['tid'])}" for e in picked})
    return kind, picked, lines


def summarize_trace(trace, updates: int, device: bool, top: int = 20) -> dict:
    kind, events, lines = kernel_events(trace, device)
    by_name = defaultdict(lambda: [0, 0.0])
    for e in events:
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += float(e["dur"])  # microseconds
    total = sum(t for _, t in by_name.values())
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(
        kind=kind,
        lines=lines,
        kernels=len(events),
        kernels_per_update=len(events) / updates,
        distinct=len(by_name),
        kernel_s=total / 1e6,
        top=[dict(name=n, launches=c, ms=t / 1e3, share=t / total if total else 0.0) for n, (c, t) in ranked],
    )


def profile_call(compiled, cfg, frozen, key, learners: int, per_call: int) -> dict:
    """Trace one (warm) call with jax.profiler.trace and summarise the trace's kernels."""
    state, keys = speed.learner_inputs(cfg, key, learners, per_call)
    state, metrics = compiled(state, frozen, None, keys)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory(prefix="ilq-trace-") as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t0 = time.perf_counter()
            state, metrics = compiled(state, frozen, None, keys)
            jax.block_until_ready(metrics)
            wall = time.perf_counter() - t0
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".json.gz"))
        path = next((f for f in files if f.endswith("perfetto_trace.json.gz")), files[0] if files else None)
        if path is None:
            raise RuntimeError(f"jax.profiler.trace wrote no trace json ({sorted(os.listdir(d))})")
        size = os.path.getsize(path)
        with gzip.open(path) as f:
            trace = json.load(f)
    summary = summarize_trace(trace, per_call, device=jax.default_backend() != "cpu")
    return dict(summary, wall_s=wall, updates=per_call, trace=os.path.basename(path), trace_mb=size / 1e6)


# ------------------------------------------------------------------------------- XLA flags: fresh processes (part 2)
def child_env(flags: str, dump: Optional[str] = None) -> dict:
    extra = [flags] if flags else []
    if dump:  # the options XLA actually uses, dumped by a probe program (nothing else matches the regex)
        extra += [f"--xla_dump_to={dump}", "--xla_dump_full_hlo_config=true", "--xla_dump_hlo_module_re=xla_options_probe"]
    return dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip())


def read_xla_options(dump: str) -> dict:
    """The command-buffer types and autotuning level XLA used for the probe program, from what --xla_dump_to wrote:
    PjRt's compile_options.textproto (every option; proto3 text leaves out an empty list and a zero), else the
    *.debug_options file (only the options that differ from XLA's defaults)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(dump) for f in fs]
    full = [f for f in files if f.endswith("compile_options.textproto")]
    path = (full or [f for f in files if f.endswith(".debug_options")] or [None])[0]
    if path is None:
        return {}
    values = defaultdict(list)
    for line in open(path):
        m = re.match(r"\s*(\w+):\s*(\S+)", line)
        if m and m.group(1) in XLA_OPTIONS:
            values[m.group(1)].append(m.group(2))
    absent = ("(none)", "0") if full else ("(XLA's default)", "(XLA's default)")
    buffers, level = values.get("xla_gpu_enable_command_buffer"), values.get("xla_gpu_autotune_level")
    return {
        COMMAND_BUFFER: ",".join(sorted(set(buffers))) if buffers else absent[0],
        AUTOTUNE: level[0] if level else absent[1],
    }


def run_child(argv: list, flags: str, timeout: Optional[float]) -> dict:
    """argv (this file, --one or --probe) in a fresh process under XLA_FLAGS + flags: its JSON line, the XLA options
    its probe program was compiled with (dumped; without the dump flags if XLA refuses them) and any error."""
    t0 = time.time()
    for dump in (tempfile.mkdtemp(prefix="ilq-xla-options-"), None):
        try:
            p = subprocess.run(argv, env=child_env(flags, dump), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(error=f"not finished within the time box ({timeout:.0f} s)")
        finally:
            options = read_xla_options(dump) if dump else {}
            if dump:
                shutil.rmtree(dump, ignore_errors=True)
        if p.returncode != 0 and dump and "Unknown flag" in p.stderr:
            continue  # an XLA without one of the dump flags: run again without them
        out = dict(options=options, process_s=time.time() - t0)
        if p.returncode != 0:
            return dict(
                out, error=f"exit {p.returncode}: " + " ".join((p.stderr or p.stdout).strip().splitlines()[-2:])[-300:]
            )
        last = (p.stdout.strip().splitlines() or ["{}"])[-1]
        return dict(json.loads(last), **out)


def child_argv(a) -> list:
    argv = [sys.executable, os.path.abspath(__file__), "--one", "--seeds", str(a.protocol_seeds)]
    argv += ["--per-call", str(a.study_calls or a.seed_calls), "--repeats", str(a.repeats)]
    return argv + (["--tiny"] if a.tiny else [])


def probe() -> None:
    """A tiny program named for --xla_dump_hlo_module_re: its dump shows the options XLA compiles with here."""

    def xla_options_probe(x):
        return x * 2.0

    jax.block_until_ready(jax.jit(xla_options_probe)(np.ones(2, np.float32)))


def one(a) -> None:
    """This file's own use (`--one`): the baseline protocol batch compiled and timed in this fresh process, under
    whatever XLA_FLAGS it was started with (the probe first); prints one JSON line."""
    probe()
    if a.tiny:
        speed.SIZES.update(speed.TINY_SIZES)
    cfg, frozen, key, _ = speed.build(False)
    v = Variant("one", "one", seeds=a.seeds)
    t0 = time.perf_counter()
    compiled = lower(v, cfg, frozen, key, a.per_call).compile()
    compile_s = time.perf_counter() - t0
    state, keys = speed.learner_inputs(cfg, key, learners_of(v), a.per_call)
    t = speed.time_calls(compiled, state, frozen, keys, a.repeats)
    print(json.dumps(dict(seconds=t, compile_s=compile_s, backend=jax.default_backend())))


# -------------------------------------------------------------------------------------- evaluation's share (part 4)
def wait_for(evaluator, submitted: int, deadline: float) -> None:
    done = 0
    while done < submitted:
        done += len(evaluator.ready())
        if done < submitted:
            if time.time() > deadline:
                raise TimeoutError("not finished within the time box")
            if not all(p.is_alive() for p, _ in evaluator.workers):
                raise RuntimeError("an evaluation worker process died")
            time.sleep(0.02)


def evaluation_share(a, learners: int, deadline: float) -> list:
    """Seconds per evaluation round of `learners` random-weight actors x --eval-episodes episodes of the full
    --eval-steps (termination off: a policy that never falls, the longest a round gets), for each --eval-workers
    count: first one round per worker (the workers start, make their envs, compile their policy), then one round per
    worker at once, timed."""
    import gymnasium as gym

    cfg = speed.config()
    env = partial(gym.make, "Hopper-v4", terminate_when_unhealthy=False, max_episode_steps=a.eval_steps)
    info = ilq.DatasetInfo(
        name="random-weight actors (speed)",
        source="none: only the evaluation env is used",
        task=None,
        family="hopper",
        eval_env=ilq.EvalEnv(f"Hopper-v4 (termination off, {a.eval_steps} steps)", env),
        ref_min=None,
        ref_max=None,
        obs_dim=speed.OBS,
        act_dim=speed.ACT,
        episode_returns=np.zeros(1),
        fingerprint="speed",
    )
    actors = speed.learner_inputs(cfg, jax.random.PRNGKey(1), learners, 1)[0].actor.params
    rows = []
    for workers in [int(w) for w in a.eval_workers.split(",")]:
        evaluator, index, t0 = ilq.Evaluator(info, cfg, learners, a.eval_episodes, workers), 0, time.time()
        try:
            for _ in range(2):  # the first W rounds start the workers; the second W are timed
                t1 = time.time()
                for _ in range(workers):
                    evaluator.submit(index, actors, ilq.evaluation_seeds(0, index, a.eval_episodes, learners), None)
                    index += 1
                wait_for(evaluator, workers, deadline)
            wall = time.time() - t1
            rows.append(dict(workers=workers, rounds=workers, wall_s=wall, s_per_round=wall / workers, start_s=t1 - t0))
        except Exception as e:  # a time box overrun or a failed worker: its row says so, the command goes on
            rows.append(dict(workers=workers, error=f"{type(e).__name__}: {str(e)[:200]}"))
            for proc in getattr(evaluator, "procs", []):
                proc.terminate()  # at once: close() would wait for the round in progress
        finally:
            evaluator.close()
        log(f"evaluation, {workers} worker(s): {rows[-1]}")
    return rows


# ----------------------------------------------------------------------------------------------------- the study
_T0 = time.time()


def log(text: str) -> None:
    print(f"[batch +{time.time() - _T0:.0f}s] {text}", flush=True)


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the protocol batch up close (--batch-study; needs --protocol-seeds)")
    g.add_argument("--batch-study", action="store_true", help="after the table: scaling, variants, profile, evaluation")
    g.add_argument("--scaling", default="1,3,5,15", help="learner counts N of the scaling rows (ILQ x N seeds)")
    g.add_argument("--study-calls", type=int, default=0, help="updates per host call in the study (0: --seed-calls)")
    g.add_argument("--profile-calls", type=int, default=20, help="updates in the profiled call (a multiple of 10)")
    g.add_argument("--eval-workers", default="1,4", help="evaluation worker processes to time")
    g.add_argument("--eval-episodes", type=int, default=10, help="episodes per learner per evaluation round")
    g.add_argument("--eval-steps", type=int, default=1000, help="steps per episode (Hopper's limit; termination off)")
    g.add_argument("--eval-interval", type=int, default=5000, help="updates between two evaluations (the paper's)")
    g.add_argument("--compile-threads", type=int, default=1, help="programs compiled at a time")
    g.add_argument("--budget-s", type=float, default=0.0, help="wall time of the whole speed.py run (0: no limit)")
    g.add_argument("--skip-xla-flags", action="store_true", help="leave out the fresh-process XLA-flag rows")
    g.add_argument(
        "--xla-runs-at-once",
        type=int,
        default=1,
        help="XLA-flag processes run together (a rehearsal's shortcut: their timings then measure nothing)",
    )


def run(a, baseline: dict, t_start: float) -> dict:
    """The four parts, within the time box; returns the raw figures (the Markdown comes from markdown())."""
    global _T0
    _T0 = time.time()
    deadline = t_start + a.budget_s if a.budget_s else float("inf")
    left = lambda: deadline - time.time()
    seeds, per_call = a.protocol_seeds, a.study_calls or a.seed_calls
    base_learners = 3 * seeds
    call_s = per_call / baseline["per_seed"]  # one call of the baseline (the table's rate)
    all_variants = variants(seeds, [int(n) for n in a.scaling.split(",") if n])
    inproc = [v for v in all_variants if not v.xla_flags]
    cfg, frozen, key, _ = speed.build(False)
    out = dict(
        seeds=seeds,
        learners=base_learners,
        per_call=per_call,
        table_calls=a.seed_calls,
        table_baseline=baseline,
        baseline=dict(baseline, seconds=call_s),
        rows={},
        skipped={},  # key -> why it was not run
        budget_s=a.budget_s,
        compile_threads=a.compile_threads,
        repeats=a.repeats,
        eval_interval=a.eval_interval,
        eval_episodes=a.eval_episodes,
        eval_steps=a.eval_steps,
    )
    threads = max(1, a.compile_threads)
    per_variant = baseline["compile_s"] / threads + (a.repeats + 3) * call_s  # a variant's estimated cost
    base_program = speed.PROGRAMS.get((False, base_learners, speed.PROTOCOL, per_call))

    # parts 1-3: trace the in-process programs here one by one, each compiling (`threads` at a time) while the next
    # is traced, then time them one by one
    futures, budget = {}, left() - 30  # the profile's and the parse's own time
    base = Variant("baseline", "baseline", seeds=seeds)
    log(f"tracing and compiling, {threads} programs at a time")
    with ThreadPoolExecutor(threads) as pool:

        def add(name: str, v: Variant, calls: int) -> None:
            nonlocal budget
            t0 = time.perf_counter()
            futures[name] = pool.submit(timed_compile, lower(v, cfg, frozen, key, calls))
            budget -= per_variant + time.perf_counter() - t0

        if base_program is None:
            add("baseline", base, per_call)
        profiled = a.profile_calls == per_call or budget >= per_variant  # first: the profile reuses or needs a program
        if a.profile_calls != per_call and profiled:
            add("profile", base, a.profile_calls)
        for v in inproc:
            if budget < per_variant:
                out["skipped"][v.key] = TIME_BOX
                continue
            add(v.key, v, per_call)
        compiled = {name: f.result() for name, f in futures.items()}
    log(f"compiled {len(compiled)} programs")
    if "baseline" in compiled:  # the study's calls differ from the table's: its own baseline, timed like the rest
        base_program, compile_s = compiled["baseline"]
        state, keys = speed.learner_inputs(cfg, key, base_learners, per_call)
        t = speed.time_calls(base_program, state, frozen, keys, a.repeats)
        out["baseline"] = dict(
            updates_per_s=base_learners * per_call / t, per_seed=per_call / t, seconds=t, compile_s=compile_s
        )
    reference = one_call(base_program, cfg, frozen, key, base_learners, per_call)
    for v in inproc:
        if v.key not in compiled:
            continue
        program, compile_s = compiled[v.key]
        fr, n = frozen_for(v, frozen), learners_of(v)
        try:
            state, keys = speed.learner_inputs(cfg, key, n, per_call)
            t = speed.time_calls(program, state, fr, keys, a.repeats)
            row = dict(updates_per_s=n * per_call / t, per_learner=per_call / t, seconds=t, compile_s=compile_s, learners=n)
            if v.methods == speed.PROTOCOL:
                row.update(differences(reference, one_call(program, cfg, fr, key, n, per_call)))
        except Exception as e:  # e.g. out of memory: the row says so, the command goes on
            row = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        out["rows"][v.key] = row
        log(f"{v.key}: {row}")
    try:
        if profiled:
            program = compiled["profile"][0] if "profile" in compiled else base_program
            out["profile"] = profile_call(program, cfg, frozen, key, base_learners, a.profile_calls)
            log(f"profile: {out['profile']['kernels_per_update']:.0f} kernels per update")
        else:
            out["skipped"]["profile"] = TIME_BOX
    except Exception as e:  # the profiler depends on the machine (CUPTI on a GPU): say why, keep the rest
        out["profile"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")

    # part 4: evaluation's share, in worker processes on the CPU cores
    if left() > 30:
        try:
            out["evaluation"] = evaluation_share(a, base_learners, deadline)
        except Exception as e:  # the evaluation env or worker setup: say why, keep the rest
            out["evaluation"] = [dict(workers=a.eval_workers, error=f"{type(e).__name__}: {str(e)[:200]}")]
    else:
        out["skipped"]["evaluation"] = TIME_BOX

    # part 2, XLA flags: each in a fresh process that reads back the options XLA used (and one with XLA's defaults)
    flagged = [v for v in all_variants if v.xla_flags]
    if a.skip_xla_flags:
        out["skipped"].update({v.key: "not run: --skip-xla-flags" for v in flagged})
        flagged = []
    if flagged and left() > 60:
        probe_argv = [sys.executable, os.path.abspath(__file__), "--probe"]
        out["xla_defaults"] = run_child(probe_argv, "", min(120.0, left())).get("options", {})
        log(f"XLA's defaults: {out['xla_defaults']}")
    cost = 15 + baseline["compile_s"] + (a.repeats + 3) * call_s  # a fresh process: start, compile, time
    at_once = max(1, a.xla_runs_at_once)
    for i in range(0, len(flagged), at_once):
        group = flagged[i : i + at_once]
        if left() < cost:
            out["skipped"].update({v.key: TIME_BOX for v in group})
            continue
        timeout = left() if left() < float("inf") else None
        with ThreadPoolExecutor(len(group)) as pool:
            results = list(pool.map(lambda v: run_child(child_argv(a), v.xla_flags, timeout), group))
        for v, r in zip(group, results):
            if "seconds" in r:
                r.update(updates_per_s=base_learners * per_call / r["seconds"], per_learner=per_call / r["seconds"])
            out["rows"][v.key] = r
            log(f"{v.key}: {r}")
    out["variants"] = [v._asdict() for v in all_variants]
    return out


def _num(x, fmt: str = ".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def markdown(r: dict, backend: str) -> list:
    seeds, per_call, base = r["seeds"], r["per_call"], r["baseline"]
    batch = f"3 methods x {seeds} seeds"
    by_key = {v["key"]: v for v in r["variants"]}
    skipped = lambda k: r["skipped"].get(k, "not run")
    lines = [
        "",
        f"### The protocol batch up close ({batch} = {r['learners']} learners in one program)",
        "",
        f"Baseline: `make_learners_update(cfg, (ilq, no-imagination, no-limitation), sample_chunk=10)`, "
        f"{batch}, fresh behaviour samples, float32 models, JAX's default matmul precision, XLA's default flags, "
        f"{per_call} updates per host call ("
        + (
            f"the {batch} row above: "
            if per_call == r["table_calls"]
            else f"measured here; the table's row at {r['table_calls']} per call: "
            f"{r['table_baseline']['updates_per_s']:.1f} updates/s in all; here: "
        )
        + f"{base['updates_per_s']:.1f} updates/s in all, {base['per_seed']:.1f} per learner). Medians of "
        f"{r['repeats']}+ calls. Programs compiled {r['compile_threads']} at a time (the compile s of programs "
        "compiled together overlap).",
        "",
        'Scaling. N learners = N seeds of ILQ alone in the same batch program (`methods=("ilq",)`, sample chunk 10): '
        "one method, so every learner does the same work; the protocol batch (three methods, whose ablations skip "
        "a branch each) for reference.",
        "",
        "| learners | program | updates/s in all | updates/s per learner | time of a call ÷ time with 1 learner | compile s |",
        "|---|---|---|---|---|---|",
    ]
    scale = [k for k in by_key if k.startswith("ilq-x")]
    one = r["rows"].get("ilq-x1")
    for k in scale:
        v, row = by_key[k], r["rows"].get(k)
        n = v["seeds"]
        if row is None:
            lines.append(f"| {n} | ILQ x {n} seed{'s' if n > 1 else ''} | {skipped(k)} | | | |")
            continue
        ratio = _num(one["per_learner"] / row["per_learner"], ".2f") if one else "n/a"
        lines.append(
            f"| {n} | ILQ x {n} seed{'s' if n > 1 else ''} | {row['updates_per_s']:.1f} | {row['per_learner']:.1f} | "
            f"{ratio} | {row['compile_s']:.1f} |"
        )
    lines.append(
        f"| {r['learners']} | {batch} (the baseline) | {base['updates_per_s']:.1f} | {base['per_seed']:.1f} | "
        + (_num(one["per_learner"] / base["per_seed"], ".2f") if one else "n/a")
        + f" | {base['compile_s']:.1f} |"
    )
    default = r.get("xla_defaults", {})
    lines += [
        "",
        f"Variants of the {batch} batch, one change each against the baseline. Max abs difference: one call of {per_call} "
        "updates from the same state with the same keys, against the baseline; the first update's metrics (losses, "
        "Q values, alpha: before any step can diverge) / all learners' parameters after the call. XLA-flag rows: "
        "each in a fresh process (XLA reads its flags when JAX starts), timed the same way.",
    ]
    if default:
        lines[-1] += (
            " XLA's defaults in this jaxlib, as a probe program in a fresh process was compiled with (its dumped options): "
            f"`{COMMAND_BUFFER}={default[COMMAND_BUFFER]}`, `{AUTOTUNE}={default[AUTOTUNE]}`."
        )
    if backend != "gpu":
        lines[-1] += f" **On this backend ({backend}) the XLA:GPU flags change nothing: those rows rehearse the processes.**"
    lines += [
        "",
        "| variant | maths | updates/s in all | updates/s per learner | ÷ baseline | compile s | "
        "max abs diff: first update's metrics / parameters after the call |",
        "|---|---|---|---|---|---|---|",
        f"| baseline ({batch}, chunk 10, float32, default precision, XLA defaults) | reference | "
        f"{base['updates_per_s']:.1f} | {base['per_seed']:.1f} | 1.00 | {base['compile_s']:.1f} | 0 / 0 |",
    ]
    for k, v in by_key.items():
        if k.startswith("ilq-x"):
            continue
        row, label = r["rows"].get(k), v["label"]
        if per_call % v["chunk"]:
            label += f" ({per_call} updates per call: the last {per_call % v['chunk']} as one shorter chunk)"
        if v["xla_flags"] and row is not None:
            got = row.get("options")
            label += " — in effect: " + (
                f"`{COMMAND_BUFFER}={got[COMMAND_BUFFER]}`, `{AUTOTUNE}={got[AUTOTUNE]}`" if got else "not read back"
            )
        if row is None:
            lines.append(f"| {label} | {v['maths']} | {skipped(k)} | | | | |")
        elif "error" in row:
            lines.append(f"| {label} | {v['maths']} | failed: {row['error'][:200]} | | | | |")
        else:
            diff = "not compared (fresh process)"
            if "params" in row:
                diff = f"{row['first_metrics']:.3g} / {row['params']:.3g}"
            lines.append(
                f"| {label} | {v['maths']} | {row['updates_per_s']:.1f} | {row['per_learner']:.1f} | "
                f"{row['per_learner'] / base['per_seed']:.2f} | {row['compile_s']:.1f} | {diff} |"
            )
    prof = r.get("profile", {})
    lines += ["", f"Profile of one call of the baseline ({batch}) with `jax.profiler.trace`:"]
    if "error" in prof:
        lines += ["", f"not available: {prof['error']}"]
    elif prof:
        busy = 100 * prof["kernel_s"] / prof["wall_s"] if prof["wall_s"] else float("nan")
        lines += [
            "",
            f"{prof['updates']} updates in the traced call, {prof['trace']} ({prof['trace_mb']:.1f} MB) parsed here: "
            f"{prof['kind']} ({len(prof['lines'])} trace lines: {', '.join(prof['lines'][:4])}"
            + (", ..." if len(prof["lines"]) > 4 else "")
            + f"). **{prof['kernels_per_update']:.0f} kernels per update** of all {r['learners']} learners "
            f"({prof['kernels']} in the call, {prof['distinct']} distinct); kernel time {prof['kernel_s'] * 1e3:.1f} ms "
            f"against {prof['wall_s'] * 1e3:.1f} ms of wall time for the call ({busy:.0f} %, summed over streams or "
            "threads). While tracing, XLA:GPU launches kernels one by one (no command buffers, "
            "`--xla_enable_command_buffers_during_profiling` is off by default): the traced call is slower than the "
            "timed ones.",
            "",
            "| # | kernel | launches | per update | device ms | share of kernel time |",
            "|---|---|---|---|---|---|",
        ]
        for i, k in enumerate(prof["top"], 1):
            name = k["name"].replace("|", "\\|")
            name = name if len(name) <= 90 else name[:87] + "..."
            lines.append(
                f"| {i} | `{name}` | {k['launches']} | {k['launches'] / prof['updates']:.1f} | {k['ms']:.2f} | "
                f"{100 * k['share']:.1f} % |"
            )
        lines.append(
            f"| | the top {len(prof['top'])} | | | {sum(k['ms'] for k in prof['top']):.2f} | "
            f"{100 * sum(k['share'] for k in prof['top']):.1f} % |"
        )
    else:
        lines += ["", skipped("profile")]
    train_s = r["eval_interval"] / base["per_seed"]
    lines += [
        "",
        f"Evaluation's share: one evaluation round = {r['learners']} learners x {r['eval_episodes']} episodes of "
        f"{r['eval_steps']} steps (random-weight actors on Hopper-v4 with termination off: the longest a round gets), "
        "in `ilq_jax.Evaluator` worker processes; W workers get W rounds at once (after a first, untimed, round each). "
        f"Training between two evaluations: {r['eval_interval']} updates at the baseline's {base['per_seed']:.1f} "
        f"updates/s per learner = {train_s:.1f} s.",
        "",
        "| eval workers | rounds at once | wall s | s per round | training s between evaluations | evaluation ÷ training |",
        "|---|---|---|---|---|---|",
    ]
    for e in r.get("evaluation", []):
        if "error" in e:
            lines.append(f"| {e['workers']} | | {e['error']} | | | |")
        else:
            lines.append(
                f"| {e['workers']} | {e['rounds']} | {e['wall_s']:.2f} | {e['s_per_round']:.2f} | {train_s:.1f} | "
                f"{e['s_per_round'] / train_s:.2f} |"
            )
    if "evaluation" not in r:
        lines.append(f"| | | {skipped('evaluation')} | | | |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", action="store_true", help="time the baseline batch in this process (under its XLA_FLAGS)")
    p.add_argument("--probe", action="store_true", help="compile a tiny probe program (its XLA options get dumped)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--per-call", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    if a.probe:
        probe()
    elif a.one:
        one(a)
    else:
        p.error("run it through benchmarks/speed.py --batch-study (this file's own use: --one or --probe)")


if __name__ == "__main__":
    main()
