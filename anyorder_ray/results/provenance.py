"""What a run was made with: the code's commit, the libraries that do its arithmetic and the CPU that ran it.

A sweep appends one record per start or ``--resume`` to ``environment.jsonl`` in its run directory. The same config
and seed train the same steps on a quiet or a loaded machine, but not to the bit on another CPU or another library
build: matmul kernels are chosen per instruction set (AVX2, AVX-512, AMX), their sums round differently, and a
trial's last bits move its on-policy data and then its success by a few points (seed 0 of the default sweep:
causal 0.960 on an Intel CPU with AMX, 0.920 on an AMD EPYC, same commit and config). A result is reproducible to
the episode where this record matches.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "numpy", "ray", "transformers", "tokenizers", "minigrid", "gymnasium", "textworld")
"""The distributions whose versions the record names (the ones that compute, seed or draw a trial's data)."""

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
"""The CPU features (``/proc/cpuinfo`` flags) that decide which matmul kernels torch runs."""

FILE = "environment.jsonl"


def environment_record(event: str = "start") -> dict[str, Any]:
    """One record of this process's environment; ``event`` says why it was taken (``start``, ``resume``)."""
    import torch

    cpuinfo = _cpuinfo()
    return {
        "event": event,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(cpuinfo),
        "cpu_count": os.cpu_count(),
        "isa": _isa_flags(cpuinfo),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.version.cuda,
        "packages": {name: _version(name) for name in PACKAGES},
        **_git_state(Path(__file__).resolve().parents[2]),
    }


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:  # not Linux
        return []


def _cpu_model(cpuinfo: list[str]) -> str:
    for line in cpuinfo:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _isa_flags(cpuinfo: list[str]) -> list[str]:
    for line in cpuinfo:
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [flag for flag in ISA_FLAGS if flag in flags]
    return []


def _git_state(root: Path) -> dict[str, Any]:
    """The commit of the code's checkout and whether it had uncommitted changes; None where it is not a checkout
    (an installed wheel, a cluster job's uploaded working directory)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "uncommitted_changes": None if status is None else bool(status)}


__all__ = ["FILE", "environment_record"]
