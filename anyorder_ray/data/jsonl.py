"""Trajectory files: one JSON object per line (``Trajectory.to_dict``), written atomically, read all-or-nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from anyorder_ray.fileio import atomic_write
from envs.trajectory import Trajectory

__all__ = ["TrajectoryFileError", "load_jsonl", "save_jsonl"]


class TrajectoryFileError(ValueError):
    """A JSONL trajectory file could not be read; names the file and line."""


def save_jsonl(path: str | os.PathLike, trajectories: Iterable[Trajectory]) -> int:
    """Write trajectories one JSON object per line, atomically. Returns the count."""
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with tmp.open("w", encoding="utf-8") as f:
            for traj in trajectories:
                f.write(json.dumps(traj.to_dict(), separators=(",", ":")))
                f.write("\n")
                count += 1

    atomic_write(path, write)
    return count


def load_jsonl(path: str | os.PathLike) -> list[Trajectory]:
    """Read a JSONL trajectory file. Any malformed line fails the whole load, naming its number."""
    path = Path(path)
    out: list[Trajectory] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append(Trajectory.from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                raise TrajectoryFileError(f"{path}:{lineno}: malformed trajectory record: {e}") from e
    return out
