"""One process of a (possibly multi-process) ``jax.distributed`` job on simulated CPU devices, for the tests.

    python tests/distributed_world.py place OUT PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES
    python tests/distributed_world.py train SD_FOLDER WORKDIR STEPS PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES

With NUM_PROCESSES > 1 the process joins a job whose coordinator (process 0) listens on localhost:PORT; each
process holds LOCAL_DEVICES devices. ``place`` shards a known global batch and writes the rows each of its
devices received to ``OUT.<process>.json``; ``train`` runs the library's ``train`` on the tiny training world
(every process on the same workdir).
"""

from __future__ import annotations

import json
import os
import socket
import sys

TRAIN_OVERRIDES = (
    "--config.checkpoint_every=1",
    "--config.log_every=1",
    "--config.sample_every=1000",
    # a non-uniform target makes the dynamic targets depend on the number of images per prompt
    "--config.attributes.gender.target=(0.3, 0.7)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def launch(mode_args: list[str], num_processes: int, local_devices: int):
    """Start the processes of one job; returns their ``Popen`` objects (stderr piped, text)."""
    import subprocess

    port = str(free_port())
    mode, *args = mode_args
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", JAX_PLATFORMS="cpu")
    script = os.path.abspath(__file__)
    return [
        subprocess.Popen(
            [sys.executable, script, mode, *args, str(rank), str(num_processes), port, str(local_devices)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(num_processes)
    ]


def _start(rank: str, num_processes: str, port: str, local_devices: str):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if int(num_processes) > 1:
        jax.distributed.initialize(f"localhost:{port}", int(num_processes), int(rank), initialization_timeout=120)
    return jax


def place(out: str, rank: str, *job) -> int:
    """Shard ``arange(16).reshape(8, 2)`` over all devices and replicate ``[1, 2, 3]``; record what each holds."""
    jax = _start(rank, *job)
    import numpy as np

    from fairdiff_jax import parallel

    mesh = parallel.make_mesh()
    sharded = parallel.shard_batch(np.arange(16, dtype=np.float32).reshape(8, 2), mesh)
    replicated = parallel.replicate(np.asarray([1.0, 2.0, 3.0], np.float32), mesh)
    record = {
        "devices": jax.device_count(),
        "shape": list(sharded.shape),
        # keyed by the device's position in the mesh (jax.devices() order; ids differ between processes)
        "rows": {str(jax.devices().index(s.device)): np.asarray(s.data).tolist() for s in sharded.addressable_shards},
        "replicated": [np.asarray(s.data).tolist() for s in replicated.addressable_shards],
    }
    with open(f"{out}.{rank}.json", "w", encoding="utf-8") as f:
        json.dump(record, f)
    return 0


def train(folder: str, workdir: str, steps: str, rank: str, *job) -> int:
    jax = _start(rank, *job)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_world import tiny_config, tiny_run

    from fairdiff_jax.train import train as train_adaptor

    cfg = tiny_config(folder, f"--config.num_steps={steps}", *TRAIN_OVERRIDES)
    result = train_adaptor(cfg, workdir, run=tiny_run(folder, cfg), progress=False)
    print(f"process {rank} of {jax.process_count()}: {jax.device_count()} devices, step {result.step}", file=sys.stderr)
    return 0 if result.finished else 1


if __name__ == "__main__":
    mode, *arguments = sys.argv[1:]
    sys.exit({"place": place, "train": train}[mode](*arguments))
