"""Memory: bytes per trajectory in the buffer, and peak RSS of a training worker for the tiny preset.

Bytes per trajectory: real bot trajectories in batches of ``episodes_per_batch`` (the rollout default), each batch
``ray.put`` into a private local Ray exactly as ``TrajectoryBuffer.add`` does, and its size read back from the object
store (``ray.experimental.get_object_locations``: the serialized size Ray stores, cloudpickle of the
``list[Trajectory]``). Also printed for reference: the pickle size of the same batch (Ray's serializer for plain Python
objects, so nearly the same), the raw UTF-8 text of the units, and the Python heap one deserialized trajectory takes in
a training worker, which caches every batch of the buffer (``BufferSource``), measured with ``tracemalloc``.

Peak RSS of a training worker, the default sweep's model (``tiny`` preset with the sweep's overrides) and data:
- ``train_worker_peak_rss_mib`` (full run only): a real 1-worker ``TorchTrainer`` running
  ``anyorder_ray.roles.train_loop.train_loop_per_worker`` for ``--steps`` steps, fed by the trial's buffer and rollout
  actor (``anyorder_ray.roles.trial.start_actors``, no eval actor); the worker process's ``VmHWM`` (the kernel's
  peak-RSS counter) is polled from ``/proc``. It includes Ray's core worker, Ray Train's worker-side modules and the
  mapped pages of objects read from the shared-memory object store.
- ``train_loop_peak_rss_mib`` (always): a fresh subprocess that imports what the worker imports
  (``anyorder_ray.roles.train_loop`` pulls in ray, ray.train and torch), holds ``data.num_demos`` trajectories (the
  whole fixed-regime buffer), builds the model and its AdamW and runs ``--steps`` steps of the loop pieces
  (``BatchMaker.bucketed`` + ``train_step``); ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. The difference to the
  figure above is what being a Ray Train worker costs.

Run: ``python bench/memory.py`` (full, ~1 minute) or ``--quick`` (< 1 minute). The figures have no target.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _common import Result, expert_data, init_local_ray, print_results

from anyorder_ray.config import RolloutConfig, load_config
from envs import Trajectory

_PEAK_TAG = "PEAK_RSS_BYTES"


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def text_bytes(trajectory: Trajectory) -> int:
    return len(trajectory.mission.encode()) + sum(len(u.text.encode()) for u in trajectory.units)


def heap_bytes_per_trajectory(blob: bytes, count: int) -> float:
    """Python heap allocated by deserializing one pickled batch, per trajectory."""
    tracemalloc.start()
    batch = pickle.loads(blob)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del batch
    return current / count


def object_store_sizes(batches: list[list[Trajectory]]) -> list[int]:
    """Sizes Ray's object store reports for each batch after ``ray.put`` (as ``TrajectoryBuffer.add`` does)."""
    import ray

    refs = [ray.put(batch) for batch in batches]
    locations = ray.experimental.get_object_locations(refs)
    sizes = [int(locations[ref]["object_size"]) for ref in refs]
    del refs
    return sizes


def _descendants(root: int) -> list[int]:
    """Process ids below ``root`` (Ray's workers are children of the raylet this driver started)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid]
        found += children
        frontier += children
    return found


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def ray_train_worker_peak(config: str, steps: int) -> int:
    """Peak RSS (``VmHWM``) of the worker of a real 1-worker ``TorchTrainer`` running ``train_loop_per_worker``.

    The trial's own actors (buffer + rollout actor, no eval actor) feed it as in a sweep; a thread polls the
    ``ray::RayTrainWorker`` process among this driver's descendants. ``VmHWM`` is the kernel's peak-RSS counter, so
    polling misses at most the growth of the last poll interval before the process exits.
    """
    import tempfile
    import threading

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from anyorder_ray.roles.train_loop import train_loop_per_worker
    from anyorder_ray.roles.trial import start_actors

    cfg = load_config(config, [f"train.max_steps={steps}", "eval.enabled=false", "train.report_every=25"])
    peak_kib, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for pid in _descendants(os.getpid()):
                try:
                    if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        peak_kib[0] = max(peak_kib[0], _status_kib(pid, "VmHWM"))
                except OSError:
                    continue  # the process just exited
            stop.wait(0.25)

    buffer, workers, runs, _, _ = start_actors(cfg)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="aoray-bench-train-") as storage:
            TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"cfg": cfg, "buffer": buffer, "evaluator": None, "producers": runs},
                scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1.0}),
                run_config=RunConfig(name="bench-memory", storage_path=storage),
            ).fit()
    finally:
        stop.set()
        poller.join()
        ray.get(buffer.stop.remote())
        for actor in [*workers, buffer]:
            ray.kill(actor, no_restart=True)
    print(
        f"[ray] 1-worker TorchTrainer, {steps} steps of train_loop_per_worker in {time.perf_counter() - start:.0f} s "
        f"(incl. start-up): worker peak RSS {peak_kib[0] / 1024:.0f} MiB",
        flush=True,
    )
    if peak_kib[0] == 0:
        raise RuntimeError("found no ray::RayTrainWorker process among this driver's descendants")
    return peak_kib[0] * 1024


def worker_process(config: str, steps: int, demos: int) -> None:
    """The training-worker stand-in (runs in a subprocess); prints its peak RSS last."""
    import torch

    from anyorder_ray.data.batching import BatchMaker, LocalSource
    from anyorder_ray.data.encoding import UnitEncoder
    from anyorder_ray.models.factory import build_model, build_tokenizer
    from anyorder_ray.training.optim import make_optimizer
    from anyorder_ray.training.recipe import train_step

    after_imports = _rss_bytes()
    cfg = load_config(config)
    torch.set_num_threads(cfg.train.torch_threads)
    data, _ = expert_data(cfg.env, range(demos))
    tokenizer = build_tokenizer(cfg.model, cfg.env)
    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed)
    optimizer, scheduler = make_optimizer(model, cfg.train)
    batches = BatchMaker(cfg.data, cfg.masking, UnitEncoder(tokenizer), tokenizer.pad_token_id, seed=cfg.train.seed)
    source = LocalSource(data, np.random.default_rng(cfg.train.seed))
    mbs, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps()
    start = time.perf_counter()
    trace = [f"{_rss_bytes() / 2**20:.0f}"]  # RSS (MiB) before the first step, then every 10 steps: plateau?
    for step in range(steps):
        micro = [batches.bucketed(source, mbs) for _ in range(accum)]
        train_step(model, optimizer, scheduler, micro, cfg.train.max_grad_norm, torch.device("cpu"))
        if (step + 1) % 10 == 0:
            trace.append(f"{_rss_bytes() / 2**20:.0f}")
    print(f"[worker] RSS MiB before training, then every 10 steps: {' '.join(trace)}", flush=True)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"[worker] {len(data)} trajectories held, model {params / 1e6:.2f}M params, {steps} steps in "
        f"{time.perf_counter() - start:.1f} s; RSS after imports {after_imports / 2**20:.0f} MiB, now "
        f"{_rss_bytes() / 2**20:.0f} MiB",
        flush=True,
    )
    print(f"{_PEAK_TAG} {_peak_rss_bytes()}", flush=True)


def measure_worker_peak(config: str, steps: int, demos: int, timeout_s: float = 600.0) -> int:
    """Run ``worker_process`` in a fresh interpreter and return its peak RSS in bytes."""
    cmd = [sys.executable, __file__, "--worker", "--config", config, "--steps", str(steps), "--demos", str(demos)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    sys.stdout.write(proc.stdout.replace(f"{_PEAK_TAG} ", "[worker] peak RSS bytes: "))
    if proc.returncode != 0:
        raise RuntimeError(f"worker subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith(_PEAK_TAG):
            return int(line.split()[1])
    raise RuntimeError(f"worker subprocess printed no {_PEAK_TAG} line:\n{proc.stdout[-2000:]}")


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trajectories and steps (< 1 minute)")
    parser.add_argument("--config", default="tune_configs/imitation.yaml")
    parser.add_argument("--trajectories", type=int, default=None, help="for bytes/trajectory (default 2048, quick 256)")
    parser.add_argument("--episodes-per-batch", type=int, default=RolloutConfig().episodes_per_batch)
    parser.add_argument("--steps", type=int, default=None, help="training steps of the worker (default 50, quick 15)")
    parser.add_argument("--demos", type=int, default=None, help="trajectories the worker holds (default: num_demos)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: the subprocess
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    steps = args.steps or (15 if args.quick else 50)
    demos = args.demos or (200 if args.quick else cfg.data.num_demos)
    if args.worker:
        worker_process(args.config, steps, demos)
        return []

    n = args.trajectories or (256 if args.quick else 2048)
    trajectories, _ = expert_data(cfg.env, range(n))
    per = args.episodes_per_batch
    batches = [trajectories[s : s + per] for s in range(0, len(trajectories) - per + 1, per)]
    import ray

    init_local_ray(num_cpus=2, object_store_mb=256)
    try:
        stored = object_store_sizes(batches)
        ray_peak = None if args.quick else ray_train_worker_peak(args.config, steps)
    finally:
        ray.shutdown()
    pickled = [len(pickle.dumps(b, protocol=5)) for b in batches]
    held = sum(len(b) for b in batches)
    store_per = sum(stored) / held
    heap_per = statistics.mean(heap_bytes_per_trajectory(pickle.dumps(b, protocol=5), len(b)) for b in batches[:8])
    raw_per = statistics.mean(text_bytes(t) for b in batches for t in b)
    steps_per = statistics.mean(t.num_actions for b in batches for t in b)
    print(
        f"{cfg.env.level}: {held} trajectories ({steps_per:.1f} steps each) in {len(batches)} batches of {per}: "
        f"object store {store_per:.0f} B/trajectory, pickle {sum(pickled) / held:.0f} B, raw unit text "
        f"{raw_per:.0f} B, deserialized Python heap {heap_per:.0f} B",
        flush=True,
    )
    print(f"training worker: {steps} steps holding {demos} trajectories ...", flush=True)
    peak = measure_worker_peak(args.config, steps, demos)
    results = [
        Result("buffer_bytes_per_trajectory", store_per),
        Result("worker_heap_bytes_per_trajectory", heap_per),
        Result("train_loop_peak_rss_mib", peak / 2**20),
    ]
    if ray_peak is not None:
        results.append(Result("train_worker_peak_rss_mib", ray_peak / 2**20))
    print_results(results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
