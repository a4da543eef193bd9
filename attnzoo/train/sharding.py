"""Mesh and shardings from the config: data, FSDP, context and tensor parallelism.

`config.mesh` (attnzoo.config.mesh_section) gives the axis sizes of one
`Mesh(devices, ("data", "fsdp", "context", "tensor"))` (-1: the devices left over), the
logical-axis rules (logical name -> mesh axes, MaxText's names), the context-parallel strategies
and whether to start JAX's multi-host runtime.

Parameters get logical names from a path- and shape-based rule (`param_logical_axes`), not from
annotations inside the modules: the leaf "embedding" is ("vocab", "embed"); in a "kernel",
axes of size d_model are "embed", the heads axis of a [D, H, d] / [H, d, D] projection is
"heads" and the other axis of a 2-D projection "mlp"; anything else (biases, norms, decay
rates, convolution taps) is replicated. So every mixer (and every new one) is sharded without
touching its code, and the same rule names the optimizer state's leaves, whose paths end in
the parameter's path. A mesh axis is used for a dimension only when it divides it (else the
dimension stays whole), so odd shapes never fail.

Activations: the batch is laid out ("batch" -> data x fsdp, "length" -> context), the
residual stream (each block's and mixer's output) is constrained to that layout through
`flax.linen.intercept_methods`, and the ops split along "context" run their exact
sequence-parallel forms (attnzoo.ops.context_parallel) inside `activate`.
"""

from __future__ import annotations

import contextlib
import os
import re

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnzoo.config import ConfigError
from attnzoo.ops import context_parallel

AXES = ("data", "fsdp", "context", "tensor")
RESIDUAL = re.compile(r"^(blocks_\d+|mixer)$")


def maybe_initialize_distributed(mesh_config) -> bool:
  """Starts JAX's multi-host runtime (one process per host, the same command on every host)
  when config.mesh.distributed is set or ATTNZOO_DISTRIBUTED=1. Coordinator, process count
  and id come from JAX's cluster auto-detection (SLURM, Open MPI, TPU pods) or from
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Returns whether it ran."""
  if not (mesh_config.distributed or os.environ.get("ATTNZOO_DISTRIBUTED") == "1"):
    return False
  if jax.distributed.is_initialized():
    return True
  env = {
    "coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "num_processes": os.environ.get("JAX_NUM_PROCESSES"),
    "process_id": os.environ.get("JAX_PROCESS_ID"),
  }
  kwargs = {k: (v if k == "coordinator_address" else int(v)) for k, v in env.items() if v}
  # CPU processes need a collectives backend of their own (GPUs and TPUs bring theirs)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """The four axis sizes, with at most one -1 filled by the devices left over."""
  sizes = [mesh_config[axis] for axis in AXES]
  for axis, size in zip(AXES, sizes):
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{axis} must be a positive integer or -1, got {size!r}")
  if sizes.count(-1) > 1:
    raise ConfigError("at most one mesh axis may be -1 (the devices left over)")
  known = int(np.prod([s for s in sizes if s != -1]))
  if num_devices % known:
    raise ConfigError(f"mesh {dict(zip(AXES, sizes))} does not divide the {num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError(
      f"mesh {dict(zip(AXES, sizes))} uses {int(np.prod(sizes))} devices; there are "
      f"{num_devices} (set one axis to -1)"
    )
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def rules(mesh_config) -> dict[str, tuple[str, ...]]:
  """Logical name -> mesh axes, from config.mesh.rules ((name, axes or None), ...)."""
  out = {}
  for name, axes in mesh_config.rules:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = set(axes) - set(AXES)
    if unknown:
      raise ConfigError(f"mesh.rules maps {name!r} to unknown mesh axes {sorted(unknown)}")
    out[name] = axes
  return out


def spec_for(logical: tuple, shape: tuple, mesh: Mesh, table: dict) -> P:
  """PartitionSpec of an array with these logical axis names: each name's mesh axes that are
  not used yet, have size > 1 and divide the dimension."""
  used, out = set(), []
  for name, dim in zip(logical, shape):
    chosen, size = [], 1
    for axis in table.get(name, ()) if name else ():
      n = mesh.shape[axis]
      if axis not in used and n > 1 and dim % (size * n) == 0:
        chosen.append(axis)
        size *= n
    used.update(chosen)
    out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def param_logical_axes(path, shape: tuple, d_model: int) -> tuple:
  """Logical names of one parameter (or optimizer-state) leaf; see the module docstring."""
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  leaf = names[-1] if names else ""
  if leaf == "embedding" and len(shape) == 2:
    return ("vocab", "embed")
  if leaf != "kernel" or len(shape) < 2:
    return (None,) * len(shape)
  axes = ["embed" if n == d_model else None for n in shape]
  if len(shape) == 3 and axes[0] == "embed" and axes[1] is None:
    axes[1] = "heads"  # [D, H, d]
  elif len(shape) == 3 and axes[2] == "embed" and axes[0] is None:
    axes[0] = "heads"  # [H, d, D]
  elif len(shape) == 2 and axes.count("embed") == 1:
    axes[axes.index(None)] = "mlp"
  return tuple(axes)


def state_shardings(abstract_state, mesh: Mesh, table: dict, d_model: int):
  """NamedShardings of a pytree of parameters / optimizer state (scalars replicated)."""

  def one(path, leaf):
    logical = param_logical_axes(path, leaf.shape, d_model)
    return NamedSharding(mesh, spec_for(logical, leaf.shape, mesh, table))

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_spec(shape: tuple, mesh: Mesh, table: dict) -> P:
  """[batch, length, ...] arrays: "batch" then "length" (when the axis divides)."""
  logical = ("batch", "length")[: len(shape)] + (None,) * max(len(shape) - 2, 0)
  return spec_for(logical, shape, mesh, table)


def batch_shardings(batch: dict, mesh: Mesh, table: dict) -> dict:
  return {k: NamedSharding(mesh, batch_spec(np.shape(v), mesh, table)) for k, v in batch.items()}


def put_batch(batch: dict, shardings: dict) -> dict:
  """Host arrays (the same global batch on every process) -> global jax.Arrays."""

  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return {k: put(v, shardings[k]) for k, v in batch.items()}


def check_batch(batch: dict, mesh: Mesh) -> None:
  """The examples split over the batch axes and the tokens over context."""
  size = len(batch["inputs"])
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if size % ways:
    raise ConfigError(f"a batch of {size} examples does not split over data x fsdp = {ways}")
  length = np.shape(batch["inputs"])[1] if np.ndim(batch["inputs"]) > 1 else 1
  if mesh.shape["context"] > 1 and length % mesh.shape["context"]:
    raise ConfigError(
      f"sequences of {length} tokens do not split over the {mesh.shape['context']} context shards"
    )


def context_plan(mesh: Mesh, mesh_config) -> context_parallel.Plan | None:
  """The context-parallel plan of config.mesh.context_parallel (None without a context axis);
  inside its shard_maps the batch is split over the mesh axes of the "batch" rule."""
  cfg = mesh_config.context_parallel
  for key, allowed in (
    ("attention", context_parallel.ATTENTION_STRATEGIES),
    ("state", context_parallel.STATE_STRATEGIES),
    ("zigzag", (True, False)),
  ):
    if cfg[key] not in allowed:
      raise ConfigError(f"mesh.context_parallel.{key} must be one of {allowed}, got {cfg[key]!r}")
  if mesh.shape["context"] == 1:
    return None
  batch_axes = tuple(a for a in rules(mesh_config).get("batch", ()) if mesh.shape[a] > 1)
  return context_parallel.Plan(
    mesh, attention=cfg.attention, zigzag=cfg.zigzag, state=cfg.state, batch_axes=batch_axes
  )


def _constrain_residual(mesh: Mesh, table: dict):
  """Interceptor: the [B, T, D] outputs of blocks and mixers keep the batch layout."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not RESIDUAL.match(context.module.name or ""):
      return out
    if isinstance(out, jax.Array) and out.ndim == 3:
      spec = batch_spec(out.shape, mesh, table)
      return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, spec))
    return out

  return interceptor


@contextlib.contextmanager
def activate(mesh: Mesh, table: dict, plan: context_parallel.Plan | None):
  """Around tracing a step: the residual-stream constraints and the context-parallel plan.
  A 1-device mesh adds nothing (the program is the unsharded one)."""
  if mesh.size == 1:
    yield
    return
  with context_parallel.use(plan), nn.intercept_methods(_constrain_residual(mesh, table)):
    yield
