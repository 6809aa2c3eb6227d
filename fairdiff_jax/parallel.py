"""Data parallelism: a 1-D ``data`` mesh, batch placement, and one per-device step run by shard_map or pmap.

The train step is written once, per device, with named-axis collectives on the axis ``"data"``
(``all_gather_group`` for the classifier outputs of a prompt's images, ``pmean`` for gradients).
``data_parallel`` runs it either with ``jax.shard_map`` over the mesh (default) or with ``jax.pmap``.

Batch layout: global per-image arrays are laid out image-major, ``[N, P, ...]`` (N images per prompt,
P prompts), and sharded on the leading axis, so every device holds ``N / D`` images of every prompt and
``all_gather_group`` along axis 0 returns the whole ``[N, P, ...]`` group on each device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fairdiff_jax.errors import FairdiffError

AXIS = "data"
MODES = ("shard_map", "pmap")

_log = logging.getLogger(__name__)


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def _put_global(x, sharding: NamedSharding):
    """Place one global array; with several processes every process passes the same whole ``x`` (the batch is a
    pure function of seed and step) and keeps the rows of its own devices."""
    if jax.process_count() > 1:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.device_put(x, sharding)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Shard every leaf of ``tree`` on its leading axis over the ``data`` axis (``P('data')``).

    The leading dimension must be divisible by the number of devices in ``mesh``.
    """
    sharding = NamedSharding(mesh, P(AXIS))
    size = mesh.shape[AXIS]

    def put(x):
        if np.ndim(x) == 0 or np.shape(x)[0] % size:
            raise FairdiffError(
                f"cannot shard an array of shape {np.shape(x)} over {size} devices: its leading dimension must "
                f"be a multiple of {size}; make train.images_per_prompt a multiple of the device count"
            )
        return _put_global(x, sharding)

    return jax.tree.map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a full copy of every leaf of ``tree`` on every device of ``mesh`` (``P()``)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def pmean(tree: Any, axis_name: str = AXIS) -> Any:
    """Mean of every leaf over the devices of ``axis_name`` (inside a ``data_parallel`` step)."""
    return jax.lax.pmean(tree, axis_name)


def all_gather_group(x: jax.Array, axis: int = 0, axis_name: str = AXIS) -> jax.Array:
    """Concatenate every device's slice of ``x`` along ``axis`` in device order.

    Inside a ``data_parallel`` step: ``[n_local, P, K] -> [N, P, K]`` with ``N = n_local * D``, the same
    order as the global, image-major batch, so prompt groups are complete on every device.
    """
    return jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)


def own_slice(full: jax.Array, local_size: int, axis: int = 0, axis_name: str = AXIS) -> jax.Array:
    """This device's part of a gathered array: rows ``[i * local_size, (i + 1) * local_size)`` on ``axis``."""
    start = jax.lax.axis_index(axis_name) * local_size
    return jax.lax.dynamic_slice_in_dim(full, start, local_size, axis=axis)


def _is_spec(x) -> bool:
    return isinstance(x, P) or x is None


def _spec_is_sharded(spec) -> bool:
    """True for ``P('data')`` (leading axis over devices), False for ``P()``; anything else is rejected."""
    if spec is None or spec == P():
        return False
    if spec == P(AXIS):
        return True
    raise FairdiffError(
        f"unsupported partition spec {spec}; data_parallel takes P('{AXIS}') (leading axis over devices) or P() "
        "(replicated)"
    )


def _pmap_wrapper(per_device_fn: Callable, mesh: Mesh, in_specs: tuple, out_specs: Any) -> Callable:
    """Run ``per_device_fn`` with ``jax.pmap``: ``[D * n, ...]`` leaves become ``[D, n, ...]`` and back."""
    devices = list(mesh.devices.flat)
    num_devices = len(devices)

    def split_leading(spec, subtree):
        if not _spec_is_sharded(spec):
            return subtree
        return jax.tree.map(lambda x: jnp.reshape(x, (num_devices, x.shape[0] // num_devices) + x.shape[1:]), subtree)

    def merge_leading(spec, subtree):
        if _spec_is_sharded(spec):
            return jax.tree.map(lambda x: jnp.reshape(x, (x.shape[0] * x.shape[1],) + x.shape[2:]), subtree)
        return jax.tree.map(lambda x: x[0], subtree)

    in_axes = tuple(jax.tree.map(lambda s: 0 if _spec_is_sharded(s) else None, in_specs, is_leaf=_is_spec))
    mapped = jax.pmap(per_device_fn, axis_name=AXIS, in_axes=in_axes, devices=devices)

    def run(*args):
        if len(args) != len(in_specs):
            raise TypeError(f"expected {len(in_specs)} arguments (one per in_spec), got {len(args)}")
        split_args = tuple(jax.tree.map(split_leading, in_specs, args, is_leaf=_is_spec))
        outputs = mapped(*split_args)
        return jax.tree.map(merge_leading, out_specs, outputs, is_leaf=_is_spec)

    return run


def data_parallel(
    per_device_fn: Callable,
    mesh: Mesh,
    *,
    in_specs: tuple,
    out_specs: Any,
    mode: str = "shard_map",
    donate_argnums: tuple[int, ...] = (),
) -> Callable:
    """Wrap a per-device step that uses ``"data"``-axis collectives for data-parallel execution.

    ``in_specs`` is a tuple with one spec (or spec pytree prefix) per positional argument and ``out_specs``
    a prefix of the output pytree; each spec is ``P('data')`` (leading axis split over devices) or ``P()``
    (replicated; for outputs, identical on every device, e.g. after ``pmean``). Gradients taken inside
    the step are per-device in both modes (shard_map runs with ``check_vma=False`` so that it matches pmap);
    average them with ``pmean``. Returns a function of the global arrays; in shard_map mode it is jitted
    and expects inputs placed with ``shard_batch`` / ``replicate``.
    """
    if mode not in MODES:
        raise FairdiffError(f"unknown parallel.mode '{mode}'; choose one of {', '.join(MODES)}")
    in_specs = tuple(in_specs)
    jax.tree.map(_spec_is_sharded, (in_specs, out_specs), is_leaf=_is_spec)  # reject unsupported specs early
    if mode == "pmap":
        return _pmap_wrapper(per_device_fn, mesh, in_specs, out_specs)
    sharded = jax.shard_map(per_device_fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(sharded, donate_argnums=donate_argnums)


def maybe_initialize_distributed(cfg) -> bool:
    """Join the hosts of a pod (``jax.distributed.initialize()``) when ``cfg.parallel.distributed`` is set.

    Must run before anything touches a device. Returns True when this call (or an earlier one) initialised
    the distributed runtime.
    """
    if not bool(cfg.parallel.distributed):
        return False
    if jax.distributed.is_initialized():
        return True
    try:
        jax.distributed.initialize()
    except (RuntimeError, ValueError) as err:
        raise FairdiffError(
            f"jax.distributed.initialize() failed ({str(err).splitlines()[0]}); run on a pod/cluster that JAX "
            "can auto-detect or set --config.parallel.distributed=False for a single host"
        ) from err
    _log.info("joined %d processes; %d devices in total", jax.process_count(), jax.device_count())
    return True
