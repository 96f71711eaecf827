"""The head of every bench's JSON: when, on what, from which commit, by which command; and the one way it is written.

A result under ``bench/results/`` names the date, the machine (the CPU and its ISA: ``avx2``, ``avx512f``,
``avx512_bf16``, ``amx_bf16``; torch's threads; the GPU), the commit (``+dirty`` with uncommitted changes) and the
exact command; :func:`head` gathers them once per process and :func:`write` puts them first in the JSON::

    from record import write        # bench/, beside the script
    write(a.json, {"figures": ...})
"""

from __future__ import annotations

import functools
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from dilm import git_revision
from dilm.files import write_json

ROOT = Path(__file__).resolve().parents[1]
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides the CPU kernels torch picks


def commit() -> str:
    """The checkout's short commit (:func:`dilm.git_revision`, the provenance's), ``+dirty`` when tracked files
    differ from it; ``unknown`` outside git."""
    rev = git_revision()
    if rev == "unknown":
        return rev
    try:
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev[:7] + ("+dirty" if dirty else "")


def cpu() -> dict:
    """The CPU's model name, the cores this process may use and which of :data:`ISA_FLAGS` it has."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": cores, "isa": [f for f in ISA_FLAGS if f in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def machine() -> dict:
    """This machine as a result names it: host, CPU (:func:`cpu`), the GPU if any, Python, torch and its threads."""
    return {"host": platform.node(), "cpu": cpu(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


@functools.lru_cache(maxsize=1)
def head() -> dict:
    """{date, commit, command, machine}, taken once: when the bench started."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
            "command": shlex.join(["python", *sys.argv]), "machine": machine()}


def write(path: str | Path, data: dict) -> None:
    """``data`` as JSON at ``path`` (atomically), :func:`head` first under ``record``."""
    write_json(Path(path), {"record": head(), **data})
