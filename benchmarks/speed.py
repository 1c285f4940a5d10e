"""How fast is the fused ILQ update, against this machine's matmul peak and against d3rlpy (PyTorch)?

    python benchmarks/speed.py                 # ~15 min on 2 CPU cores; writes the Speed section of RESULTS.md
    python benchmarks/speed.py --quick         # a smoke run (1 repeat, 1 and 10 per call): prints, writes nothing
    python benchmarks/speed.py --quick --out-md /tmp/speed.md   # a smoke run written to a file, marked as such
    python benchmarks/speed.py --protocol-seeds 5 --batch-study  # also the 15-learner batch up close (batch_study.py)

At the paper's settings (batch 256, M = 10 behaviour samples, K = 5 diffusion steps, 3 x 256 actor and critics,
a 7 x 4 x 200 dynamics ensemble, hopper sizes: 11-dim states, 3-dim actions, 100k transitions on the device),
with random weights (speed does not depend on them). Measured: compile time; updates/s for 1, 10, 100 and 1000
updates per host call (ilq_jax.make_update_fn: lax.scan inside one jit, state donated, as train() runs it); each
part of the update alone; FLOPs per update from XLA's cost analysis; the measured float32 matmul peak; utilisation =
FLOPs/update x updates/s / peak; all for fresh behaviour samples (the paper) and for --behavior-bank. Medians over
--repeats. The load average is recorded with the figures: run on a quiet machine.

FLOPs: XLA's cost analysis counts the body of a loop once, whatever its trip count, so the compiled K-step
diffusion scan would count as one step and a call of 1000 updates as one update. The FLOP counts are therefore
taken from a single update (ilq_jax.ilq_update) lowered with every lax.scan fully unrolled; a call of n updates
does n times that work. (The only loop left is threefry's, integer work the count does not need.)
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results_md import command, git_commit, machine, write_section  # noqa: E402

import ilq_jax as ilq  # noqa: E402

OBS, ACT = 11, 3
# The paper's sizes; --tiny shrinks every network and the dataset so that a rehearsal of the script runs in seconds.
SIZES = dict(n=100_000, hidden=256, batch=256, dyn_hidden=200, matmul=None)
TINY_SIZES = dict(n=2_000, hidden=32, batch=32, dyn_hidden=32, matmul=(256, 512))


def median_time(fn, repeats: int, min_time: float = 0.0) -> float:
    """Median wall time of fn() (which must block), over `repeats` calls and at least `min_time` seconds."""
    times, t_all = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - t_all < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def flops_of(compiled) -> float:
    """XLA's own FLOP count of a compiled program (a dict, or a list of one dict per device in older JAX)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


@contextlib.contextmanager
def unrolled_scans():
    """Trace with every jax.lax.scan fully unrolled, so that XLA's cost analysis sees every step of a loop."""
    scan = jax.lax.scan
    jax.lax.scan = lambda *a, **k: scan(*a, **{**k, "unroll": True})
    try:
        yield
    finally:
        jax.lax.scan = scan


def counted_flops(fn, *args) -> float:
    """FLOPs of fn(*args) by XLA's cost analysis, every scan unrolled (compiled for the count only). A fresh
    wrapper, since jit reuses the (rolled) trace of a function it has seen."""
    with unrolled_scans():
        return flops_of(jax.jit(lambda *x: fn(*x)).lower(*args).compile())


def config() -> ilq.ILQConfig:
    """The one place the speed measurements build their ILQConfig: hopper sizes, the paper's hopper-random row
    (eta 0.9, delta 1, penalty 1, learning rates 3e-4 / 1e-4), batch and width from SIZES."""
    return ilq.ILQConfig.for_task("hopper-random", OBS, ACT, 1_000_000, batch_size=SIZES["batch"], hidden_dim=SIZES["hidden"])


def build(bank: bool, seed: int = 0):
    """Random-weight models and a random device-resident dataset at the paper's sizes (or --tiny's)."""
    N, hidden, dyn_hidden = SIZES["n"], SIZES["hidden"], SIZES["dyn_hidden"]
    k = jax.random.split(jax.random.PRNGKey(seed), 8)
    data = ilq.Transitions(
        jax.random.normal(k[0], (N, OBS)),
        jax.random.uniform(k[1], (N, ACT), minval=-1, maxval=1),
        jax.random.normal(k[2], (N,)),
        jax.random.normal(k[3], (N, OBS)),
        jnp.zeros(N),
    )
    net = ilq.DynamicsEnsemble(OBS + 1, 7, dyn_hidden, 4)
    dyn = ilq.DynamicsModel(
        net.init(k[4], jnp.zeros((1, OBS + ACT))),
        jnp.zeros(OBS + ACT),
        jnp.ones(OBS + ACT),
        jnp.arange(5),
        OBS,
        7,
        dyn_hidden,
        4,
        "hopper",
    )
    noise_net = ilq.NoiseNet(ACT, hidden)
    beh = ilq.BehaviorModel(
        noise_net.init(k[5], jnp.zeros((1, ACT)), jnp.zeros(1, jnp.int32), jnp.zeros((1, OBS))), ACT, 5, hidden
    )
    cfg = config()
    # the bank's contents do not matter for speed: random actions, not ilq.make_behavior_bank's 100k x M samples
    behavior_bank = jax.random.uniform(k[6], (N, cfg.num_behavior_samples, ACT), minval=-1, maxval=1) if bank else None
    beh = beh.replace(mish=ilq.mish_one_exp) if hasattr(ilq, "mish_one_exp") else beh  # as train() runs the model
    return cfg, ilq.Frozen(data, dyn, beh), k[7], behavior_bank


_FLOPS = {}
PROGRAMS = {}  # (bank, learners, methods, updates per call) -> the compiled program fused() timed (batch_study reuses it)


PROTOCOL = ("ilq", "no-imagination", "no-limitation")


def learner_inputs(cfg, key, learners: int, per_call: int):
    """A fresh train state of `learners` learners and the keys of one call of `per_call` updates, as fused() makes them
    (the same key: the same values)."""
    state = jax.vmap(partial(ilq.init_train_state, cfg))(jax.random.split(key, learners))
    return state, jax.random.split(key, learners * per_call).reshape(learners, per_call, -1)


def time_calls(compiled, state, frozen, keys, repeats: int, bank=None) -> float:
    """Median seconds of one call of a compiled update (its state donated and carried from call to call)."""
    holder, work = {"state": state}, keys.shape[0] * keys.shape[1]

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, bank, keys)
        jax.block_until_ready(metrics)

    if work < 100 or repeats < 3:
        run()  # warm-up (for long calls the median of 3+ repeats already leaves a slow first call out)
    return median_time(
        run,
        repeats if work >= 100 else 5 * repeats,
        min_time=(0.2 if SIZES["matmul"] else 2.0) if work < 100 else 0.0,
    )


def fused(bank: bool, calls, repeats: int, seeds: int = 1, methods=None) -> dict:
    """updates/s of train()'s compiled update: `seeds` learners vmapped in one jitted lax.scan of `per_call` updates;
    with methods, seeds learners of each (the protocol batch), behaviour samples drawn 10 updates at a time."""
    cfg, frozen, key, behavior_bank = build(bank)
    update = ilq.make_learners_update(cfg, methods or ("ilq",), sample_chunk=10 if methods else 1)
    learners = seeds * len(methods or [None])
    if bank not in _FLOPS:  # the work of one update does not depend on how many run per call or in parallel
        _FLOPS[bank] = counted_flops(partial(ilq.ilq_update, cfg), ilq.init_train_state(cfg, key), frozen, key)
    flops = _FLOPS[bank]
    name = f"{'bank ' if bank else 'fresh'} x{seeds} seed{'s' if seeds > 1 else ''}" + (" x 3 methods" if methods else "")
    print(f"[speed] {name} one update: {flops / 1e9:.3f} GFLOP (XLA, scans unrolled)", flush=True)
    out = {}
    for per_call in calls:
        state, keys = learner_inputs(cfg, key, learners, per_call)
        t0 = time.perf_counter()
        compiled = update.lower(state, frozen, behavior_bank, keys).compile()
        compile_s = time.perf_counter() - t0
        PROGRAMS[(bank, learners, methods, per_call)] = compiled
        t = time_calls(compiled, state, frozen, keys, repeats, behavior_bank)
        out[per_call] = dict(
            updates_per_s=learners * per_call / t, per_seed=per_call / t, compile_s=compile_s, flops=flops, seeds=learners
        )
        print(
            f"[speed] {name} {per_call:5d} updates/call: {learners * per_call / t:8.1f} updates/s in all, "
            f"{per_call / t:8.1f} per seed (compile {compile_s:.1f}s)",
            flush=True,
        )
    return out


def parts(repeats: int) -> dict:
    """Each piece of the update alone at batch 256, jitted on its own (fresh behaviour samples unless named)."""
    cfg, frozen, key, _ = build(False)
    _, _, _, bank = build(True)
    state = ilq.init_train_state(cfg, key)
    batch = jax.tree_util.tree_map(lambda x: x[:256], frozen.data)
    obs, act, m = batch.observations, batch.actions, cfg.num_behavior_samples
    fresh = lambda st, fr, b, k: ilq.ilb_targets(cfg, st, fr, b, ilq.diffusion_sample(fr.behavior, b.observations, k, m), k)  # noqa: E731
    targets = fresh(state, frozen, batch, key)

    def critic_step(critic):
        return critic.apply_gradients(grads=jax.grad(lambda p: ilq.critic_loss(cfg, p, batch, targets)[0])(critic.params))

    pieces = {
        f"behaviour sampling ({256 * m} actions, K={frozen.behavior.K})": (
            partial(ilq.diffusion_sample, frozen.behavior, num_samples=m),
            (obs, key),
        ),
        "dynamics step (7-member ensemble)": (partial(ilq.dynamics_step, frozen.dynamics), (obs, act, key)),
        "ILB targets (all of Eq. 17-20, fresh samples)": (fresh, (state, frozen, batch, key)),
        "ILB targets (all of Eq. 17-20, `--behavior-bank`)": (
            lambda st, fr, b, k: ilq.ilb_targets(cfg, st, fr, b, bank[:256], k),
            (state, frozen, batch, key),
        ),
        "critic update (Eq. 16, given targets)": (critic_step, (state.critic,)),
        "actor + alpha update (Eq. 21)": (partial(ilq.actor_alpha_update, cfg), (state, obs, key)),
    }
    out = {}
    for name, (fn, args) in pieces.items():
        compiled = jax.jit(fn).lower(*args).compile()
        t = median_time(lambda: jax.block_until_ready(compiled(*args)), 20 * repeats, min_time=1.0)
        out[name] = dict(ms=1e3 * t, flops=counted_flops(fn, *args))
        print(f"[speed] part: {name}: {1e3 * t:.2f} ms, {out[name]['flops'] / 1e9:.3f} GFLOP", flush=True)
    return out


def matmul_peak(repeats: int) -> dict:
    """The best median rate of a square float32 matmul over a few sizes (JAX's default matmul precision)."""
    sizes = SIZES["matmul"] or ((1024, 2048, 4096) if jax.default_backend() == "cpu" else (4096, 8192, 16384))
    mm = jax.jit(lambda x, y: x @ y)
    best = dict(n=0, flops_per_s=0.0)
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        jax.block_until_ready(mm(a, a))
        t = median_time(lambda a=a: jax.block_until_ready(mm(a, a)), 5 * repeats, min_time=0.2 if SIZES["matmul"] else 2.0)
        print(f"[speed] float32 matmul {n}x{n}: {2 * n**3 / t / 1e9:.1f} GFLOP/s", flush=True)
        if 2 * n**3 / t > best["flops_per_s"]:
            best = dict(n=n, flops_per_s=2 * n**3 / t)
        del a
    return best


def peers(python: str, steps: int, repeats: int) -> dict:
    if not os.path.exists(python):
        print(f"[speed] no peers virtualenv at {python}: skipping d3rlpy (see benchmarks/README.md)", flush=True)
        return {}
    out = subprocess.run(
        [python, os.path.join(ROOT, "benchmarks", "peers_speed.py"), "--steps", str(steps), "--repeats", str(repeats)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"peers_speed.py failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    sys.modules.setdefault("speed", sys.modules[__name__])  # batch_study imports this file as `speed`: one module, not two
    import batch_study

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calls", default="1,10,100,1000", help="updates per host call to measure (one seed)")
    p.add_argument("--seeds", default="1,2,4,8", help="learners vmapped in one call, for the seeds table")
    p.add_argument("--seed-calls", type=int, default=100, help="updates per host call in the seeds table")
    p.add_argument("--skip-parts", action="store_true", help="leave out the per-part timings")
    p.add_argument("--protocol-seeds", type=int, default=0, help="also: 3 methods x this many seeds in one program")
    p.add_argument(
        "--peers-python",
        default=os.path.join(ROOT, ".venv-peers", "bin", "python"),
        help="python of the peers virtualenv (benchmarks/requirements-peers.txt); skipped if absent",
    )
    p.add_argument("--peer-steps", type=int, default=300, help="timed d3rlpy updates per repeat")
    p.add_argument(
        "--out-md",
        default=None,
        help="Markdown file whose section --section is (re)written (default benchmarks/RESULTS.md; "
        "with --quick nothing is written unless this is given)",
    )
    p.add_argument("--section", default="speed", help="name of the RESULTS.md section to write")
    p.add_argument("--title", default="Speed", help="the section's heading")
    p.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="1 repeat, calls 1 and 10, seeds 1 and 2, 20 peer steps")
    p.add_argument("--tiny", action="store_true", help="tiny networks and data (a rehearsal: not the paper's sizes)")
    batch_study.add_args(p)
    a = p.parse_args(argv)
    if a.batch_study and not a.protocol_seeds:
        p.error("--batch-study studies the protocol batch: give --protocol-seeds")
    if a.tiny:
        SIZES.update(TINY_SIZES)
    if a.quick:
        a.repeats, a.calls, a.seeds, a.seed_calls, a.peer_steps = 1, "1,10", "1,2", 10, 20
    out_md = a.out_md or (None if a.quick else os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    calls, seed_counts = [int(c) for c in a.calls.split(",")], [int(n) for n in a.seeds.split(",")]
    t_start, load_start = time.time(), os.getloadavg()
    peak = matmul_peak(a.repeats)
    results = {bank: fused(bank, calls, a.repeats) for bank in (False, True)}
    by_seeds = {  # one seed at seed_calls is a program of the table above: measured once
        bank: {
            n: results[bank][a.seed_calls]
            if n == 1 and a.seed_calls in calls
            else fused(bank, [a.seed_calls], a.repeats, n)[a.seed_calls]
            for n in seed_counts
        }
        for bank in (False, True)
    }
    protocol = {}
    for bank in (False, True) if a.protocol_seeds else ():  # the paper's protocol batch: 3 methods x N seeds
        protocol[bank] = fused(bank, [a.seed_calls], a.repeats, a.protocol_seeds, PROTOCOL)[a.seed_calls]
    study = batch_study.run(a, protocol[False], t_start) if a.batch_study else None
    part_times = {} if a.skip_parts else parts(a.repeats)
    peer = peers(a.peers_python, a.peer_steps, a.repeats)
    load_end = os.getloadavg()

    versions = ilq.package_versions()
    best = max(calls)
    lines = []
    if a.quick or a.tiny:
        lines += ["**Smoke run (`--quick`/`--tiny`: few repeats or tiny sizes): not a measurement.**", ""]
    lines += [
        f"Machine: {machine()}. Commit {git_commit()}. "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("python", "jax", "jaxlib", "flax", "optax"))
        + f"; matmul precision {jax.config.jax_default_matmul_precision or 'default'}. "
        f"Command: `{command()}` ({time.time() - t_start:.0f} s). Medians of {a.repeats}+ repeats. "
        f"1-min load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end "
        f"(this script itself keeps about {os.cpu_count() if jax.default_backend() == 'cpu' else 1} busy).",
        "",
        f"Measured float32 matmul peak (best of square sizes, {peak['n']}x{peak['n']}): "
        f"**{peak['flops_per_s'] / 1e9:.1f} GFLOP/s**.",
        "",
        'One learner (train()\'s compiled update: `make_learners_update(cfg, ("ilq",))` with one seed):',
        "",
        "| behaviour actions | updates per host call | updates/s | compile s | GFLOP per update (XLA) | "
        "achieved GFLOP/s | utilisation of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {False: "fresh samples (paper)", True: "`--behavior-bank`"}
    for bank in (False, True):
        for c in calls:
            r = results[bank][c]
            achieved = r["flops"] * r["updates_per_s"]
            lines.append(
                f"| {names[bank]} | {c} | {r['updates_per_s']:.1f} | {r['compile_s']:.1f} | "
                f"{r['flops'] / 1e9:.3f} | {achieved / 1e9:.1f} | {100 * achieved / peak['flops_per_s']:.0f} % |"
            )
    lines += [
        "",
        f"N learners in one process (`--num-seeds N`: jax.vmap over the train state and keys, "
        f"{a.seed_calls} updates per host call):",
        "",
        "| behaviour actions | seeds N | updates/s in all | updates/s per seed | time of N seeds ÷ time of one "
        "| utilisation of peak |",
        "|---|---|---|---|---|---|",
    ]
    for bank in (False, True):
        base = by_seeds[bank][seed_counts[0]]["per_seed"]
        for n in seed_counts:
            r = by_seeds[bank][n]
            slowdown = base / r["per_seed"]  # wall time of a call with N seeds over that with the first N
            lines.append(
                f"| {names[bank]} | {n} | {r['updates_per_s']:.1f} | {r['per_seed']:.1f} | {slowdown:.2f} | "
                f"{100 * r['flops'] * r['updates_per_s'] / peak['flops_per_s']:.0f} % |"
            )
    for bank, r in protocol.items():
        lines.append(
            f"| {names[bank]} | 3 methods x {a.protocol_seeds} seeds (`--methods ilq,no-imagination,no-limitation`) | "
            f"{r['updates_per_s']:.1f} | {r['per_seed']:.1f} | | "
            f"{100 * r['flops'] * r['updates_per_s'] / peak['flops_per_s']:.0f} % (ILQ's FLOPs per learner) |"
        )
    if study:
        lines += batch_study.markdown(study, jax.default_backend())
    if part_times:
        lines += [
            "",
            "GFLOP per update: XLA's cost analysis of one update with every `lax.scan` unrolled (XLA counts "
            "a loop body once, so the compiled programs themselves under-count).",
            "",
            "Each part alone (batch 256, jitted on its own):",
            "",
            "| part | ms | GFLOP (XLA) | GFLOP/s | utilisation of peak |",
            "|---|---|---|---|---|",
        ]
        for name, r in part_times.items():
            lines.append(
                f"| {name} | {r['ms']:.2f} | {r['flops'] / 1e9:.3f} | {r['flops'] / r['ms'] / 1e6:.1f} | "
                f"{100 * r['flops'] / r['ms'] * 1e3 / peak['flops_per_s']:.0f} % |"
            )
    if peer:
        ours, bank = results[False][best]["updates_per_s"], results[True][best]["updates_per_s"]
        v = peer["versions"]
        lines += [
            "",
            f"PyTorch peers, run by `{os.path.relpath(a.peers_python, ROOT)} benchmarks/peers_speed.py` "
            f"within this command: d3rlpy {v['d3rlpy']}, torch {v['torch']} on {peer.get('device', 'cpu')} "
            f"({v['threads']} threads), batch 256, 3 x 256 networks, 100k random hopper-sized transitions; "
            f"timed: `algo.update(batch)` on batches sampled beforehand ({a.peer_steps} updates per repeat, "
            f"median of {peer['repeats']}). ILQ: {best} updates per host call.",
            "",
            "| algorithm | updates/s | ILQ fresh (paper) ÷ peer | ILQ `--behavior-bank` ÷ peer |",
            "|---|---|---|---|",
        ]
        for algo, ups in peer["updates_per_s"].items():
            lines.append(f"| d3rlpy {algo} | {ups:.1f} | {ours / ups:.2f} | {bank / ups:.2f} |")
        lines.append(f"| ilq-jax ILQ, fresh samples | {ours:.1f} | 1.00 | |")
        lines.append(f"| ilq-jax ILQ, `--behavior-bank` | {bank:.1f} | | 1.00 |")
    else:
        lines += ["", f"PyTorch peers: skipped (no virtualenv at `{os.path.relpath(a.peers_python, ROOT)}`)."]
    text = "\n".join(lines)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                dict(
                    peak=peak,
                    per_call={str(b): results[b] for b in results},
                    by_seeds={str(b): by_seeds[b] for b in by_seeds},
                    protocol_batch={str(b): protocol[b] for b in protocol},
                    batch_study=study,
                    machine=machine(),
                    versions=versions,
                ),
                f,
            )
    if out_md:
        write_section(out_md, a.section, f"## {a.title}\n\n" + text)
        print(f"[speed] wrote the {a.section} section of {out_md}")
    return dict(results=results, by_seeds=by_seeds, peak=peak, text=text, batch_study=study)


if __name__ == "__main__":
    main()
