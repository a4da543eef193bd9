"""Context (sequence) parallelism: the plan, and the collectives every family's exact
sequence-parallel form is built from (attnzoo.ops.sequence_parallel).

A `Plan` names the mesh, its sequence axis ("context") and the strategies. While a plan is in
use (`with use(plan):`, what the trainer does around its train step), the ops
(softmax_attention, linear_attention, delta_rule, selective_scan, short_conv, long_conv) route
a call on global [B,T,...] arrays through `jax.shard_map` over that axis; everything else stays
automatic (GSPMD). A plan whose axis has size 1, or a call already inside the shard_map, runs
the op as before. This is scoped, like `jax.set_mesh`: nothing changes outside the `with`.

Collectives here:
- `exclusive_prefix`: the state each shard starts from, for a recurrence whose shard summary is
  an affine map x -> A(x) + S (diagonal decay: A a vector; delta rule: A a K x K matrix).
  "allgather" is LASP-2 (Sun et al. 2025, "LASP-2: Rethinking Sequence Parallelism for Linear
  Attention and Its Hybrid"): one all-gather of the W summaries, then a local fold; unlike the
  released LASP-2 code it carries the decay/transition, so gated and delta-rule families are
  exact. "logscan" is a Hillis-Steele scan over ranks with log2(W) ppermute rounds (the
  ZeCO idea, Chou et al. 2025, "ZeCO: Zero Communication Overhead Sequence Parallelism for
  Linear Attention": each rank receives only what it needs, no W-fold gathered memory; ZeCO's
  All-Scan pipelines a chain instead). LASP (Sun et al. 2024, "Linear Attention Sequence
  Parallelism") passes the state along a chain of W-1 hops; not implemented here.
- `previous_rows`: the halo of rows before a shard (convolutions, windows): a ppermute, or an
  all-gather when it is wider than a shard.
Gradients are JAX's transposes of these collectives (all-gather -> reduce-scatter, ppermute ->
the reverse ppermute), so forward and backward are exact.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

ATTENTION_STRATEGIES = ("ring", "allgather_kv")
STATE_STRATEGIES = ("allgather", "logscan")


@dataclasses.dataclass(frozen=True)
class Plan:
  """mesh: the device mesh; axis: its sequence axis. attention: "ring" (KV blocks rotate by
  ppermute, online-softmax merge) or "allgather_kv"; zigzag: causal load balance (shard r
  holds chunks r and 2W-1-r of 2W); state: "allgather" (LASP-2) or "logscan" for the
  linear-attention, delta-rule and selective-scan families. batch_axes: mesh axes the batch
  is split over; the shard_map splits it over them too (when they divide it), so each device
  computes only its examples."""

  mesh: Mesh
  axis: str = "context"
  attention: str = "ring"
  zigzag: bool = True
  state: str = "allgather"
  batch_axes: tuple[str, ...] = ()

  def __post_init__(self):
    if self.axis not in self.mesh.axis_names:
      raise ValueError(f"context parallelism: the mesh has no axis {self.axis!r}")
    if self.attention not in ATTENTION_STRATEGIES:
      raise ValueError(
        f"context parallelism: attention strategy must be one of {ATTENTION_STRATEGIES}, "
        f"got {self.attention!r}"
      )
    if self.state not in STATE_STRATEGIES:
      raise ValueError(
        f"context parallelism: state strategy must be one of {STATE_STRATEGIES}, got {self.state!r}"
      )

  @property
  def size(self) -> int:
    return self.mesh.shape[self.axis]


_ACTIVE: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("attnzoo_cp", default=None)


@contextlib.contextmanager
def use(plan: Plan | None):
  """Ops called (traced) inside route through `plan`; None turns routing off."""
  token = _ACTIVE.set(plan)
  try:
    yield plan
  finally:
    _ACTIVE.reset(token)


def active() -> Plan | None:
  """The plan an op called now must follow, or None (no plan, axis of size 1, or already
  inside the shard_map over the axis)."""
  plan = _ACTIVE.get()
  if plan is None or plan.size == 1:
    return None
  if plan.axis in jax.sharding.get_abstract_mesh().manual_axes:
    return None
  return plan


def shard_sequence(
  plan: Plan,
  body: Callable,
  sequence: tuple,
  examples: tuple,
  replicated: tuple,
  out_specs: Callable,
):
  """body(*sequence, *examples, *replicated) in a shard_map over plan.axis (and
  plan.batch_axes): the `sequence` arrays [B,T,...] are split along T (and B), `examples`
  [B,...] along B only, `replicated` ones are whole on every shard (None passes through).
  out_specs(tokens, examples) gives the output specs from the specs of those two kinds. Other
  mesh axes stay automatic. Ops called inside run locally (routing is off there)."""
  b, t = sequence[0].shape[:2]
  if t % plan.size:
    raise ValueError(
      f"context parallelism: sequence length {t} does not split over the {plan.size} shards "
      f"of mesh axis {plan.axis!r}"
    )

  def local(*args):
    with use(None):
      return body(*args)

  ways = 1
  for axis in plan.batch_axes:
    ways *= plan.mesh.shape[axis]
  batch = (
    (plan.batch_axes if len(plan.batch_axes) > 1 else plan.batch_axes[0])
    if (plan.batch_axes and b % ways == 0)
    else None
  )
  tokens = P(batch, plan.axis)
  specs = (
    tuple(tokens for _ in sequence)
    + tuple(P(batch) for _ in examples)
    + tuple(P() for _ in replicated)
  )
  return jax.shard_map(
    local,
    mesh=plan.mesh,
    in_specs=specs,
    out_specs=out_specs(tokens, P(batch)),
    axis_names={plan.axis, *plan.batch_axes},
    check_vma=False,  # Pallas (interpret) bodies and scans with zero-initialised carries
  )(*sequence, *examples, *replicated)


def rank(plan: Plan) -> jax.Array:
  return lax.axis_index(plan.axis)


def _shift(x, plan: Plan, distance: int):
  """x of rank r - distance on rank r; zeros on ranks < distance."""
  perm = [(i, i + distance) for i in range(plan.size - distance)]
  return lax.ppermute(x, plan.axis, perm)


def previous_rows(x: jax.Array, width: int, plan: Plan, fill=0) -> jax.Array:
  """The `width` rows (axis 1) before this shard's first one; `fill` (a scalar or an array
  [B,width,...]) stands for rows before the sequence. One ppermute when width fits in a shard,
  else an all-gather of x."""
  if width == 0:
    return x[:, :0]
  shape = (x.shape[0], width, *x.shape[2:])
  fill = jnp.broadcast_to(jnp.asarray(fill, x.dtype), shape)
  local = x.shape[1]
  if width > local:
    whole = jnp.concatenate([fill, lax.all_gather(x, plan.axis, axis=1, tiled=True)], axis=1)
    return lax.dynamic_slice_in_dim(whole, rank(plan) * local, width, axis=1)
  got = _shift(x[:, local - width :], plan, 1)
  return jnp.where(rank(plan) == 0, fill, got)


def continues(segment_ids: jax.Array | None, plan: Plan) -> jax.Array | None:
  """[B] bool: the shard's first token is in the segment the previous shard ends with (always
  on the first shard, whose first segment takes the initial state); None without segments."""
  if segment_ids is None:
    return None
  before = previous_rows(segment_ids, 1, plan, segment_ids[:, :1])
  return before[:, 0] == segment_ids[:, 0]


def only_if(keep: jax.Array | None, x: jax.Array) -> jax.Array:
  """x where keep [B] (x's leading axis), else 0; x itself when keep is None."""
  if keep is None:
    return x
  return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))


def last_shard(x: jax.Array, plan: Plan) -> jax.Array:
  """x of the last shard, on every shard (one all-reduce)."""
  return lax.psum(jnp.where(rank(plan) == plan.size - 1, x, jnp.zeros_like(x)), plan.axis)


def exclusive_prefix(
  A: jax.Array,
  S: jax.Array,
  initial: jax.Array | None,
  plan: Plan,
  *,
  apply: Callable[[jax.Array, jax.Array], jax.Array],
  compose: Callable[[jax.Array, jax.Array], jax.Array],
  total: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """The state entering this shard when shard j maps an incoming state x to apply(A_j, x) + S_j
  and shard 0 starts from `initial` (zeros when None); with total=True also the state after
  the last shard (on every shard). compose(a, b) is the map "b, then a"."""
  x0 = jnp.zeros_like(S) if initial is None else initial.astype(S.dtype)
  r = rank(plan)
  if plan.state == "allgather":
    As = lax.all_gather(A, plan.axis)
    Ss = lax.all_gather(S, plan.axis)
    x, entering = x0, []
    for j in range(plan.size):
      entering.append(x)
      x = apply(As[j], x) + Ss[j]
    return jnp.stack(entering)[r], (x if total else None)
  # logscan: inclusive scan of the affine maps over ranks, log2(W) ppermute rounds
  a, s = A, jnp.where(r == 0, apply(A, x0) + S, S)
  distance = 1
  while distance < plan.size:
    pa, ps = _shift(a, plan, distance), _shift(s, plan, distance)
    has = r >= distance
    a, s = jnp.where(has, compose(a, pa), a), jnp.where(has, apply(a, ps) + s, s)
    distance *= 2
  entering = jnp.where(r == 0, x0, _shift(s, plan, 1))
  return entering, (last_shard(s, plan) if total else None)


def zigzag_order(length: int, shards: int) -> jax.Array:
  """Token order that gives shard r chunks r and 2W-1-r of 2W equal chunks (causal load
  balance); needs length % (2 shards) == 0."""
  chunk = length // (2 * shards)
  chunks = []
  for r in range(shards):
    chunks += [jnp.arange(r * chunk, (r + 1) * chunk)]
    chunks += [jnp.arange((2 * shards - 1 - r) * chunk, (2 * shards - r) * chunk)]
  return jnp.concatenate(chunks)
