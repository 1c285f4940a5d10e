"""Write one named section of benchmarks/RESULTS.md, leaving the other sections as they are."""

import os
import platform
import shlex
import subprocess
import sys
import time
from functools import partial


def machine() -> str:
    """CPU model, cores, accelerators, OS, date: what every figure is qualified by."""
    import jax

    cpu = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"{cpu}, {os.cpu_count()} cores; JAX devices: {jax.default_backend()} ({devices}); "
        f"{platform.system()} {platform.release()}; {time.strftime('%Y-%m-%d')}"
    )


def git_commit() -> str:
    try:
        git = partial(subprocess.run, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        head = git(["git", "rev-parse", "--short", "HEAD"]).stdout.strip() or "unknown"
        # the measured code differs from HEAD when ilq_jax.py or a benchmark script has uncommitted changes
        dirty = git(["git", "status", "--porcelain", "--", "../ilq_jax.py", "*.py"]).stdout.strip()
        return head + (" with uncommitted changes" if dirty else "")
    except OSError:
        return "unknown"


def command() -> str:
    return "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write_section(path: str, name: str, text: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = (
        open(path).read()
        if os.path.exists(path)
        else "# Results\n\nEvery number below was written by the script named with it.\n"
    )
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(new)
