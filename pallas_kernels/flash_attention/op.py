"""`flash_attention`: argument checks (`reason`, `hopper_reason`), padding, tile schedules and
the custom_vjp around the Pallas kernels (calls.py; the Hopper forward in hopper.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import common

from . import calls, kernels
from . import hopper as hopper_lib
from . import schedule as sched_lib
from .tuning import TPU_TUNING, Tuning, default_tuning

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256
# Largest schedule (query tiles x kv tiles) computed with numpy while tracing and embedded as a
# constant; larger ones are computed by XLA.
MAX_STATIC_SCHEDULE = 2**18
# TPU: tiles are multiples of the 128 lanes (every dynamic slice tile-aligned); the schedules
# of one kernel, scalar-prefetched, may take half of the 1 MiB SMEM.
TPU_TILE = 128
TPU_SMEM_BUDGET = 2**19


def _largest_pow2_divisor(n):
  return n & -n


def _tile(block, t, user_block, floor):
  b = min(block, common.next_pow2(t, floor))
  if user_block is not None:
    b = min(b, _largest_pow2_divisor(user_block))
  return b


def _tiles(tuning, tq, tk, user_blocks, floor):
  """Kernel tiles: the tuning's block sizes, no larger than T needs, dividing the user mask
  blocks."""
  uq, uk = user_blocks
  return dict(
    block_q=_tile(tuning.block_q, tq, uq, floor),
    block_k=_tile(tuning.block_k, tk, uk, floor),
    block_q_dq=_tile(tuning.block_q_dq, tq, uq, floor),
    block_k_dq=_tile(tuning.block_k_dq, tk, uk, floor),
    block_q_dkv=_tile(tuning.block_q_dkv, tq, uq, floor),
    block_k_dkv=_tile(tuning.block_k_dkv, tk, uk, floor),
  )


def _padded_lengths(tiles, tq, tk):
  bq = max(tiles["block_q"], tiles["block_q_dq"], tiles["block_q_dkv"])
  bk = max(tiles["block_k"], tiles["block_k_dq"], tiles["block_k_dkv"])
  return common.round_up(tq, bq), common.round_up(tk, bk)


def _tpu_reason(q, k, v, block_mask_size, tuning, per_batch_schedule):
  """Why the TPU kernels cannot serve these shapes (tiles, VMEM, SMEM), or None."""
  if block_mask_size is not None and any(b % TPU_TILE for b in block_mask_size):
    return (
      f"on TPU block_mask_size entries must be multiples of {TPU_TILE} (kernel tiles "
      f"divide them), got {block_mask_size}"
    )
  batch, tq, heads, d = q.shape
  tk, kv_heads = k.shape[1], k.shape[2]
  itemsize = 4 if q.dtype == jnp.float16 else q.dtype.itemsize  # f16 runs in f32 on TPU
  tiles = _tiles(tuning or TPU_TUNING, tq, tk, block_mask_size or (None, None), TPU_TILE)
  if any(t % TPU_TILE for t in tiles.values()):
    return f"on TPU every block size must be a multiple of {TPU_TILE}, got {tuning}"
  tq_pad, tk_pad = _padded_lengths(tiles, tq, tk)
  width = common.round_up(d, TPU_TILE) + common.round_up(v.shape[-1], TPU_TILE)
  # Whole-sequence blocks (single-buffered): K, V (forward, dq); the group's Q, dO and their
  # lse/delta rows (dk/dv); int32 position and segment rows (padded to 8 sublanes).
  kv = tk_pad * (width * itemsize + 2 * 8 * 4)
  groups = heads // kv_heads
  qdo = groups * tq_pad * (width * itemsize + 2 * 8 * 4) + 2 * 8 * 4 * tq_pad
  vmem = max(kv, qdo)
  if vmem > calls.TPU_VMEM_LIMIT - 8 * 2**20:
    return (
      f"on TPU the kernels keep whole-sequence K/V and Q/dO blocks in VMEM: Tq {tq}, Tk "
      f"{tk}, head_dim {d}, {groups} q heads per kv head need {vmem / 2**20:.0f} MiB, "
      f"over {calls.TPU_VMEM_LIMIT // 2**20 - 8} MiB"
    )
  rows = batch if per_batch_schedule else 1
  nq = max(tq_pad // tiles[n] for n in ("block_q", "block_q_dq", "block_q_dkv"))
  nk = max(tk_pad // tiles[n] for n in ("block_k", "block_k_dq", "block_k_dkv"))
  smem = 4 * rows * max(nq * common.round_up(2 + nk, 128), nk * common.round_up(2 + nq, 128))
  if smem > TPU_SMEM_BUDGET:
    return (
      f"on TPU the tile schedule ({rows} x {nq} x {nk} tiles) needs {smem // 1024} KiB "
      f"of SMEM, over {TPU_SMEM_BUDGET // 1024} KiB"
    )
  return None


def reason(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  block_mask_size: tuple[int, int] | None = None,
  platform: str | None = None,
  tuning: Tuning | None = None,
  per_batch_schedule: bool = True,
) -> str | None:
  """Why the kernel cannot serve these shapes/dtypes, or None (static check, no tracing).

  `platform` as in `flash_attention`; `per_batch_schedule`: whether the masks differ across
  the batch (segment ids, explicit positions or a block mask), which sizes the TPU schedule.
  """
  if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    return (
      f"flash kernel needs q, k, v of one dtype in f32/bf16/f16, got {q.dtype}, {k.dtype}, "
      f"{v.dtype}"
    )
  if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
    return f"flash kernel supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}/{v.shape[-1]}"
  if block_mask_size is not None:
    for b in block_mask_size:
      if b % 16:
        return (
          "block_mask_size entries must be multiples of 16 (kernel tiles divide them), got "
          f"{block_mask_size}"
        )
  if common.resolve_platform(platform) == "tpu":
    return _tpu_reason(q, k, v, block_mask_size, tuning, per_batch_schedule)
  return None


@functools.cache
def _sm90_default_device() -> bool:
  """Whether the default device is an NVIDIA GPU of compute capability 9.x (Hopper)."""
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return False
  cc = getattr(device, "compute_capability", None)
  return device.platform == "gpu" and isinstance(cc, str) and cc.split(".")[0] == "9"


def hopper_reason(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale,
  causal: bool = False,
  window=None,
  segment_ids=None,
  kv_segment_ids=None,
  q_positions=None,
  kv_positions=None,
  softcap=None,
  block_mask=None,
  platform: str | None = None,
  interpret: bool = False,
  tuning: Tuning | None = None,
) -> str | None:
  """Why the Hopper (Mosaic GPU) forward cannot serve these arguments, or None (static check;
  the device is not queried: `flash_attention(hopper=None)` adds that)."""
  if common.resolve_platform(platform) != "gpu":
    return "the Hopper forward runs on GPU only"
  if interpret:
    return "the Hopper forward has no interpret mode (wgmma)"
  extras = dict(
    window=window,
    segment_ids=segment_ids,
    kv_segment_ids=kv_segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
    softcap=softcap,
    block_mask=block_mask,
  )
  if used := [name for name, val in extras.items() if val is not None]:
    return f"the Hopper forward does not support {', '.join(used)}"
  if not isinstance(scale, (int, float, np.floating, np.integer)) or not scale > 0:
    return "the Hopper forward needs a static positive Python-number scale"
  if not (q.dtype == k.dtype == v.dtype):
    return f"the Hopper forward needs one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}"
  d, dv = q.shape[-1], v.shape[-1]
  if d != dv:
    return f"the Hopper forward needs v's head dim equal to q's, got {d} and {dv}"
  if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2] or q.shape[2] % k.shape[2]:
    return (
      f"the Hopper forward needs k, v of one shape with Hkv dividing H, got {k.shape}, {v.shape}"
    )
  if causal and q.shape[1] != k.shape[1]:
    return f"the Hopper forward needs Tq == Tk when causal, got {q.shape[1]} and {k.shape[1]}"
  dp = common.next_pow2(d, 16)
  return hopper_lib.config_reason(
    dp, q.dtype, tuning or default_tuning(dp, jnp.dtype(q.dtype).itemsize, causal=causal)
  )


@dataclasses.dataclass(frozen=True)
class _HopperCall:
  """Static arguments of the Hopper forward inside `_flash`."""

  tuning: Tuning
  scale: float
  causal: bool
  kv_len: int  # real keys; padded ones are masked


def _hopper_forward(q, k, v, hop: _HopperCall):
  """The Hopper forward on the Triton-padded q, k, v; o and lse2 shaped as calls.forward's.

  Pads Tq to 2 * hopper_block_q and cuts or pads Tk to round_up(kv_len, hopper_block_kv), then
  slices the results back to the padded Tq the Triton backward expects."""
  tq_pad, tk_pad = q.shape[1], k.shape[1]
  tq_h, tk_h = hopper_lib.padded_lengths(tq_pad, hop.kv_len, hop.tuning)
  qh = _pad_axis(q, 1, tq_h)
  kh, vh = (_pad_axis(x, 1, max(tk_pad, tk_h))[:, :tk_h] for x in (k, v))
  o, lse2 = hopper_lib.forward(
    qh, kh, vh, scale=hop.scale, causal=hop.causal, kv_len=hop.kv_len, tuning=hop.tuning
  )
  return o[:, :tq_pad], lse2[:, :, :tq_pad]


def _pad_axis(x, axis, size, mode="constant", value=0, xp=jnp):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  if mode == "edge":
    return xp.pad(x, widths, mode="edge")
  return xp.pad(x, widths, constant_values=value)


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale,
  causal: bool = False,
  window: int | tuple[int, int] | None = None,
  segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
  softcap: float | None = None,
  block_mask: jax.Array | None = None,
  block_mask_size: tuple[int, int] | None = None,
  return_lse: bool = False,
  tuning: Tuning | None = None,
  interpret: bool = False,
  platform: str | None = None,
  hopper: bool | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Blockwise softmax attention with Pallas forward and backward kernels.

  q[B,Tq,H,D], k[B,Tk,Hkv,D], v[B,Tk,Hkv,Dv] (BTHD; Hkv divides H). `scale` is a Python
  number or a per-head array [H] (differentiable: a learned temperature). Masks:
  `causal`, `window=(left, right)`, `segment_ids`/`kv_segment_ids` [B,T], explicit
  `q_positions`/`kv_positions` [B,T] (kv position 2**31-1 = empty slot), and a block-sparse
  `block_mask` [B|1, ceil(Tq/bq), ceil(Tk/bk)] bool with `block_mask_size=(bq, bk)`.
  Tiles with nothing visible are skipped. Returns o[B,Tq,H,Dv] (and lse[B,Tq,H] float32,
  natural log, -inf on rows that see nothing, when return_lse).

  `platform`: "gpu" (Triton lowering) or "tpu" (Mosaic TPU lowering: BHTD layout inside,
  tiles of 128, TPU_TUNING by default; float16 inputs run the float32 kernels, Mosaic
  having no float16 vectors); None picks "tpu" when jax.default_backend() is
  "tpu", else "gpu". `interpret` runs the kernels in Pallas interpret mode (TPU: the Mosaic
  TPU interpreter, pltpu.InterpretParams).

  `hopper`: the forward kernel. None: the Hopper (Mosaic GPU: TMA, wgmma, warp-specialised;
  hopper.py) forward when the platform is "gpu", not interpreted, the default device is an
  sm90 GPU and `hopper_reason` finds nothing against the arguments; else the Triton one.
  True: the Hopper forward, or NotImplementedError saying why not. False: Triton. The
  backward is the Triton kernels in every case.

  `tuning`: tiles and launch knobs of every kernel, the Hopper forward's included (None:
  `default_tuning` for the head dim, dtype and mask, or `TPU_TUNING`).
  """
  platform = common.resolve_platform(platform)
  if hopper is None or hopper:
    why_hopper = hopper_reason(
      q,
      k,
      v,
      scale=scale,
      causal=causal,
      window=window,
      segment_ids=segment_ids,
      kv_segment_ids=kv_segment_ids,
      q_positions=q_positions,
      kv_positions=kv_positions,
      softcap=softcap,
      block_mask=block_mask,
      platform=platform,
      interpret=interpret,
      tuning=tuning,
    )
    if hopper and why_hopper:
      raise NotImplementedError(why_hopper)
    hopper = why_hopper is None and (hopper or _sm90_default_device())
  tpu = platform == "tpu"
  # Default positions and no segments / block mask: the schedule depends only on shapes.
  static_masks = (
    q_positions is None and kv_positions is None and segment_ids is None and block_mask is None
  )
  why = reason(
    q,
    k,
    v,
    block_mask_size=block_mask_size,
    platform=platform,
    tuning=tuning,
    per_batch_schedule=not static_masks,
  )
  if why:
    raise NotImplementedError(why)
  if tpu and q.dtype == jnp.float16:
    # Mosaic has no float16 vectors (not even loads or stores): the float32 kernels serve
    # float16 inputs (IEEE f32 dots, exact on f16 values); o goes back to float16.
    f32 = lambda x: x.astype(jnp.float32)
    r = flash_attention(
      f32(q),
      f32(k),
      f32(v),
      scale=scale,
      causal=causal,
      window=window,
      segment_ids=segment_ids,
      kv_segment_ids=kv_segment_ids,
      q_positions=q_positions,
      kv_positions=kv_positions,
      softcap=softcap,
      block_mask=block_mask,
      block_mask_size=block_mask_size,
      return_lse=return_lse,
      tuning=tuning,
      interpret=interpret,
      platform=platform,
    )
    return (r[0].astype(q.dtype), r[1]) if return_lse else r.astype(q.dtype)
  batch, tq, heads, d = q.shape
  tk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[-1]
  if heads % kv_heads:
    raise ValueError(f"kv heads {kv_heads} must divide q heads {heads}")
  groups = heads // kv_heads
  if window is not None:
    if isinstance(window, int):
      window = (window, 0)
    window = (int(window[0]), int(window[1]))
  if tuning is None and tpu:
    tuning = TPU_TUNING
  if tuning is None:
    local = window is not None and window[0] + window[1] < tk // 2
    tuning = default_tuning(max(d, dv), jnp.dtype(q.dtype).itemsize, local=local, causal=causal)
  ub = block_mask_size if block_mask is not None else (None, None)
  tiles = _tiles(tuning, tq, tk, ub, TPU_TILE if tpu else 16)
  tq_pad, tk_pad = _padded_lengths(tiles, tq, tk)

  if isinstance(scale, (int, float, np.floating, np.integer)):
    static_scale, scale_arr = float(scale), None
  else:
    static_scale = None
    scale_arr = jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(-1), (heads,))
  if softcap is not None:
    softcap = float(softcap)
  cfg = kernels.Static(
    contiguous_full=bool(tuning.direct_full and static_masks),
    head_group=tuning.head_group,
    static_scale=static_scale,
    causal=bool(causal),
    window=window,
    has_segments=segment_ids is not None,
    softcap=softcap,
    groups=groups,
    precise=q.dtype == jnp.float32,
    interpret=bool(interpret),
    tpu=tpu,
    fast_exp2=not interpret and not tpu and kernels.nvidia_gpu(),
    num_warps=tuning.num_warps,
    num_stages=tuning.num_stages,
    num_warps_dq=tuning.num_warps_dq,
    num_stages_dq=tuning.num_stages_dq,
    num_warps_dkv=tuning.num_warps_dkv,
    num_stages_dkv=tuning.num_stages_dkv,
    **tiles,
  )

  # Positions and segments, padded: padded keys are empty slots; padded queries repeat the
  # last real query (so tile summaries stay tight) and their outputs are dropped. With static
  # masks the positions are one row [1, T] shared by the batch, and (unless the schedule is
  # large) they and the schedules are numpy constants.
  min_tile = min(tiles.values())
  small = (tq_pad // min_tile) * (tk_pad // min_tile) <= MAX_STATIC_SCHEDULE
  xp = np if static_masks and small else jnp
  if q_positions is None:
    q_positions = xp.arange(tq, dtype=xp.int32)[None]
  if kv_positions is None:
    kv_positions = xp.arange(tk, dtype=xp.int32)[None]
  if not static_masks:
    q_positions = jnp.broadcast_to(q_positions, (batch, tq))
    kv_positions = jnp.broadcast_to(kv_positions, (batch, tk))
  q_pos = _pad_axis(xp.asarray(q_positions, xp.int32), 1, tq_pad, "edge", xp=xp)
  kv_pos = _pad_axis(xp.asarray(kv_positions, xp.int32), 1, tk_pad, value=common.EMPTY, xp=xp)
  q_seg = kv_seg = None
  if segment_ids is not None:
    if kv_segment_ids is None:
      kv_segment_ids = segment_ids
    q_seg = _pad_axis(jnp.asarray(segment_ids, jnp.int32), 1, tq_pad, "edge")
    kv_seg = _pad_axis(jnp.asarray(kv_segment_ids, jnp.int32), 1, tk_pad, "edge")

  def kinds(bq, bk):
    user = None
    if block_mask is not None:
      user = sched_lib.user_tiles(
        block_mask,
        block_mask_size,
        batch=batch,
        nq=tq_pad // bq,
        nk=tk_pad // bk,
        block_q=bq,
        block_k=bk,
      )
    return sched_lib.tile_kinds(
      q_pos,
      kv_pos,
      q_seg,
      kv_seg,
      block_q=bq,
      block_k=bk,
      causal=causal,
      window=window,
      user_tiles=user,
      xp=xp,
    )

  sched_fwd = sched_lib.schedule_rows(kinds(cfg.block_q, cfg.block_k), xp)
  sched_dq = (
    sched_fwd
    if (cfg.block_q_dq, cfg.block_k_dq) == (cfg.block_q, cfg.block_k)
    else sched_lib.schedule_rows(kinds(cfg.block_q_dq, cfg.block_k_dq), xp)
  )
  sched_dkv = sched_lib.schedule_rows(
    xp.swapaxes(kinds(cfg.block_q_dkv, cfg.block_k_dkv), 1, 2), xp
  )
  aux = (q_pos, kv_pos, q_seg, kv_seg, sched_fwd, sched_dq, sched_dkv)

  if tpu:  # head dims fill the 128 lanes; the kernels take BHTD
    dp, dvp = common.round_up(d, TPU_TILE), common.round_up(dv, TPU_TILE)
  else:
    dp, dvp = common.next_pow2(d, 16), common.next_pow2(dv, 16)
  qp = _pad_axis(_pad_axis(q, 1, tq_pad), 3, dp)
  kp = _pad_axis(_pad_axis(k, 1, tk_pad), 3, dp)
  vp = _pad_axis(_pad_axis(v, 1, tk_pad), 3, dvp)
  if tpu:
    qp, kp, vp = (jnp.swapaxes(x, 1, 2) for x in (qp, kp, vp))
  hop = None
  if hopper:
    hop = _HopperCall(tuning, float(scale), bool(causal), tk)
  o, lse2 = _flash(qp, kp, vp, scale_arr, aux, cfg, hop)
  if tpu:
    o = jnp.swapaxes(o, 1, 2)
  o = o[:, :tq, :, :dv]
  if not return_lse:
    return o
  lse2 = jnp.swapaxes(lse2[:, :, :tq], 1, 2)
  lse = jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * kernels.LN2)
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, scale_arr, aux, cfg, hop):
  out, _ = _flash_fwd(q, k, v, scale_arr, aux, cfg, hop)
  return out


def _flash_fwd(q, k, v, scale_arr, aux, cfg, hop):
  q_pos, kv_pos, q_seg, kv_seg, sched_fwd, _, _ = aux
  if hop is not None:  # same o / lse2 conventions: the Triton backward below reads them
    o, lse2 = _hopper_forward(q, k, v, hop)
  else:
    o, lse2 = calls.forward(q, k, v, scale_arr, q_pos, kv_pos, q_seg, kv_seg, sched_fwd, cfg)
  return (o, lse2), (q, k, v, scale_arr, aux, o, lse2)


def _flash_bwd(cfg, hop, res, cts):
  del hop
  q, k, v, scale_arr, aux, o, lse2 = res
  do, dlse2 = cts
  q_pos, kv_pos, q_seg, kv_seg, _, sched_dq, sched_dkv = aux
  do = do.astype(q.dtype)
  seq = "bhtd" if cfg.tpu else "bthd"  # the kernels' layout
  # delta_i = sum_d o*do; an lse cotangent enters as dlogits += p * dlse (natural units).
  delta = jnp.einsum(f"{seq},{seq}->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  if dlse2 is not None and not isinstance(dlse2, jax.custom_derivatives.SymbolicZero):
    delta = delta - dlse2.astype(jnp.float32) / kernels.LN2
  dq = calls.backward_dq(
    q, k, v, do, lse2, delta, scale_arr, q_pos, kv_pos, q_seg, kv_seg, sched_dq, cfg
  )
  dk, dv = calls.backward_dkv(
    q, k, v, do, lse2, delta, scale_arr, q_pos, kv_pos, q_seg, kv_seg, sched_dkv, cfg
  )
  dscale = None
  if cfg.static_scale is None:
    # dq came back unscaled: dL/dscale_h = sum q . dq_raw; dq = scale * dq_raw.
    dscale = jnp.einsum(f"{seq},{seq}->h", q.astype(jnp.float32), dq)
    per_head = scale_arr[None, :, None, None] if cfg.tpu else scale_arr[None, None, :, None]
    dq = (dq * per_head).astype(q.dtype)
  zero_aux = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), aux)
  return dq, dk, dv, dscale, zero_aux


_flash.defvjp(_flash_fwd, _flash_bwd)
