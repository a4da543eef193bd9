"""Flash-attention forward for Hopper (sm90) in Pallas Mosaic GPU: TMA, wgmma, warp specialisation.

The FlashAttention-3 schedule (Shah et al. 2024, "FlashAttention-3: Fast and Accurate Attention
with Asynchrony and Low-precision"): one CTA per (2 * block_q query rows, head, batch) runs
three warpgroups.
- warpgroup 2 (producer, few registers) streams the K and V tiles of the kv head through a ring
  of `Tuning.hopper_stages` shared-memory slots with TMA; a "full" barrier per slot says a tile
  landed, a "free" barrier per (consumer, slot) says that consumer is done reading it, so a
  consumer that needs fewer tiles (causal) never holds the other back;
- warpgroups 0 and 1 (consumers) each own `block_q` query rows: S = Q K^T by wgmma into a
  float32 accumulator, online softmax in exp2 with the scale folded in (s2 = log2(e) * scale *
  q.k), O += P V by wgmma with P from registers. A two-party barrier ping-pongs the
  consumers, so one's softmax runs while the other's GEMMs hold the tensor cores
  (`Tuning.hopper_overlap` instead pipelines each consumer on its own: the next tile's Q K^T
  runs during this tile's softmax).
Causal: kv tiles above the diagonal are never loaded; only the tiles that straddle the
diagonal (or hold padded keys >= `kv_len`) are masked. The output goes registers -> shared
memory (the Q slab, free by then) -> global memory by TMA, and so does lse2.

Conventions are those of `calls.forward` (read by the Triton backward kernels unchanged):
o[B, Tq, H, D] in the input dtype and lse2[B, H, Tq] float32 = log2 sum_k 2^(s2_k) over the
visible keys. Every query row sees key 0 here (kv_len >= 1; causal needs Tq == Tk on default
positions), so no row is empty and no +inf appears.

Lowering needs no device (jax.export for platforms=["cuda"] runs on CPU); only PTX -> SASS and
execution need an sm90 GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common

from .kernels import LN2, LOG2E
from .tuning import Tuning, default_tuning

DTYPES = (jnp.bfloat16, jnp.float16)
HEAD_DIMS = (64, 128, 256)
# Hopper shared memory per CTA (227 KiB; Mosaic GPU checks it while lowering). The kernel asks
# for no reduction scratch (CompilerParams.reduction_scratch_bytes=0).
SMEM_BYTES = 227 * 1024
# Register split after `setmaxnreg`: 2 consumer warpgroups x 128 threads x 240 + 128 x 24 =
# 64512 <= the 65536 registers of an SM.
CONSUMER_REGISTERS = 240
PRODUCER_REGISTERS = 24
SWIZZLE = 128  # bytes: 64 bf16/f16 elements per swizzled row


# Alternatives to time against the defaults on an H200 at D=128 (all fit shared memory and
# lower; experiments/gpu/hopper_attention_check.py times them).
CANDIDATES = {
  "default": Tuning(),
  "s3": Tuning(hopper_stages=3),
  "kv64_s4": Tuning(hopper_block_kv=64, hopper_stages=4),
  "kv192": Tuning(hopper_block_kv=192),
  "q128_kv64": Tuning(hopper_block_q=128, hopper_block_kv=64),
  "overlap": Tuning(hopper_pingpong=False, hopper_overlap=True),
  "overlap_kv64_s3": Tuning(
    hopper_block_kv=64, hopper_stages=3, hopper_pingpong=False, hopper_overlap=True
  ),
  "no_pingpong": Tuning(hopper_pingpong=False),
}


def smem_bytes(head_dim: int, dtype_bytes: int, tuning: Tuning) -> int:
  """Shared memory of one CTA: the two Q/O slabs, the K and V rings, lse2 rows, barriers."""
  bq, bkv, stages = tuning.hopper_block_q, tuning.hopper_block_kv, tuning.hopper_stages
  qo = 2 * bq * head_dim * dtype_bytes
  kv = 2 * stages * bkv * head_dim * dtype_bytes
  barriers = 8 * (3 + 6 * stages)
  return qo + kv + 2 * bq * 4 + barriers + 512  # + alignment (Mosaic's count +- 384)


def _knobs(tuning: Tuning) -> str:
  return (
    f"{tuning.hopper_block_q} x {tuning.hopper_block_kv} tiles, {tuning.hopper_stages} "
    f"stages{', overlap' if tuning.hopper_overlap else ''}"
  )


def config_reason(head_dim: int, dtype, tuning: Tuning) -> str | None:
  """Why this head dim / dtype / tuning cannot run, or None."""
  if jnp.dtype(dtype) not in tuple(map(jnp.dtype, DTYPES)):
    return f"the Hopper forward supports bf16/f16, got {jnp.dtype(dtype).name}"
  if head_dim not in HEAD_DIMS:
    return f"the Hopper forward supports head_dim in {HEAD_DIMS} (after padding), got {head_dim}"
  need = smem_bytes(head_dim, jnp.dtype(dtype).itemsize, tuning)
  if need > SMEM_BYTES:
    return (
      f"the Hopper forward needs {need} bytes of shared memory for head_dim "
      f"{head_dim} with {_knobs(tuning)}, over {SMEM_BYTES}"
    )
  # Registers: the O accumulator and S tile, float32, per consumer thread (128 threads).
  regs = (
    tuning.hopper_block_q
    * (head_dim + tuning.hopper_block_kv * (2 if tuning.hopper_overlap else 1))
    // 128
  )
  if regs > 192:
    return (
      f"the Hopper forward keeps {regs} float32 accumulator registers a thread for "
      f"head_dim {head_dim} with {_knobs(tuning)}; at most 192 fit"
    )
  return None


def padded_lengths(tq: int, tk: int, tuning: Tuning) -> tuple[int, int]:
  """Tq, Tk rounded up to the kernel's tiles (2 * hopper_block_q query rows, hopper_block_kv
  keys)."""
  return (
    common.round_up(tq, 2 * tuning.hopper_block_q),
    common.round_up(tk, tuning.hopper_block_kv),
  )


def forward(
  q, k, v, *, scale: float, causal: bool, kv_len: int | None = None, tuning: Tuning | None = None
):
  """o[B,Tq,H,D], lse2[B,H,Tq] of softmax attention; q, k, v BTHD, padded to the tiles.

  q [B,Tq,H,D], k/v [B,Tk,Hkv,D] with Tq a multiple of 2 * hopper_block_q and Tk of
  hopper_block_kv (see `padded_lengths`); keys at positions >= `kv_len` (default Tk) are
  masked. `causal`: key j visible to query i iff j <= i (the same positions for q and k).
  `tuning`: its hopper_* knobs (None: `default_tuning`).
  """
  batch, tq, heads, d = q.shape
  _, tk, kv_heads, _ = k.shape
  if v.shape != k.shape:
    raise ValueError(f"the Hopper forward needs v shaped like k {k.shape}, got {v.shape}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if heads % kv_heads:
    raise ValueError(f"kv heads {kv_heads} must divide q heads {heads}")
  tuning = tuning or default_tuning(d, jnp.dtype(q.dtype).itemsize)
  if why := config_reason(d, q.dtype, tuning):
    raise NotImplementedError(why)
  bq, bkv, stages = tuning.hopper_block_q, tuning.hopper_block_kv, tuning.hopper_stages
  if tq % (2 * bq) or tk % bkv:
    raise ValueError(f"Tq {tq} must be a multiple of {2 * bq} and Tk {tk} of {bkv}")
  kv_len = tk if kv_len is None else int(kv_len)
  if not 0 < kv_len <= tk or tk - kv_len >= bkv:
    raise ValueError(f"kv_len {kv_len} must lie in (Tk - block_kv, Tk] = ({tk - bkv}, {tk}]")
  groups = heads // kv_heads
  n_q, n_kv = tq // (2 * bq), tk // bkv
  # kv tiles with every key < kv_len (the rest, at most the last one, mask padded keys).
  n_kv_unpadded = kv_len // bkv
  c = float(scale) * LOG2E  # logits in log2 units: s2 = c * q.k
  if c <= 0:
    raise ValueError(f"the Hopper forward needs a positive scale, got {scale}")
  dtype = q.dtype

  def kv_steps(q0):
    """(kv tiles visited, of which unmasked) by the query rows [q0, q0 + bq)."""
    if not causal:
      return n_kv, n_kv_unpadded
    n = jnp.minimum(lax.div(q0 + bq + bkv - 1, bkv), n_kv)
    return n, jnp.minimum(lax.div(q0, bkv), n_kv_unpadded)

  def body(
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    qo_smem,
    lse_smem,
    k_smem,
    v_smem,
    q_full,
    k_full,
    v_full,
    k_free,
    v_free,
    turn,
  ):
    # Heaviest causal tiles first: their kv loops are the longest.
    qt = lax.axis_index("q")
    if causal:
      qt = n_q - 1 - qt
    h = lax.axis_index("h")
    b = lax.axis_index("b")
    wg = lax.axis_index("wg")
    cta_q0 = qt * (2 * bq)
    n_max, _ = kv_steps(cta_q0 + bq)  # the second consumer's rows see the most keys

    def handoff():  # both consumers meet here; see `pingpong`
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
      q0 = cta_q0 + wg * bq
      q_smem = qo_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], q_smem, q_full.at[wg])
      n_steps, n_unmasked = kv_steps(q0)
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
      l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
      acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
      plgpu.barrier_wait(q_full.at[wg])
      if tuning.hopper_pingpong:
        pl.when(wg == 1)(handoff)  # consumer 1 starts one turn behind

      def softmax(j, s, acc, m, l, masked):
        """Online softmax of the logits tile s (kv tile j): new acc, m, l and P (in dtype)."""
        if masked:
          rows = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
          cols = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
          key = cols + j * bkv
          visible = key < kv_len
          if causal:
            visible &= key <= rows + q0
          s = jnp.where(visible, s, -jnp.inf)
        # Log2 units; c > 0 so max(c * s) = c * max(s), and c * s - m is one fma.
        m_new = jnp.maximum(m, s.max(axis=1) * c)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        return acc, m_new, l, p.astype(dtype)

      def step(j, carry, masked):
        """One kv tile: S = Q K^T, softmax, O += P V (ping-ponged with the other consumer)."""
        acc, m, l = carry
        slot = lax.rem(j, stages)
        free = wg * stages + slot
        plgpu.barrier_wait(k_full.at[slot])

        def qk_fn(s_ref):
          plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
          if tuning.hopper_pingpong:
            handoff()  # the other consumer's softmax ran while our QK^T was issued
          return s_ref[...]

        s = pl.run_scoped(qk_fn, plgpu.ACC((bq, bkv), jnp.float32))
        plgpu.barrier_arrive(k_free.at[free])
        acc, m, l, p = softmax(j, s, acc, m, l, masked)
        if tuning.hopper_pingpong:
          # Finish the softmax before handing over (else it may sink past the handoff).
          acc, m, l, p = lax.optimization_barrier((acc, m, l, p))
          plgpu.barrier_arrive(turn)  # softmax done: the other consumer may take the GEMMs
        plgpu.barrier_wait(v_full.at[slot])
        if tuning.hopper_pingpong:
          plgpu.barrier_wait(turn)

        def pv_fn(o_acc):
          plgpu.wgmma(o_acc, p, v_smem.at[slot])

        acc = pl.run_state(pv_fn)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[free])
        return acc, m, l

      def qk(slot):
        def qk_fn(s_ref):
          plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
          return s_ref[...]

        return pl.run_scoped(qk_fn, plgpu.ACC((bq, bkv), jnp.float32))

      def overlapped_step(j, carry, masked):
        """FA3 Algorithm 2: S_{j+1} = Q K_{j+1}^T runs on the tensor cores during the softmax
        of S_j (carried in registers); then O += P_j V_j."""
        acc, m, l, s = carry
        slot = lax.rem(j, stages)
        nxt = j + 1
        nslot = lax.rem(nxt, stages)
        has_next = nxt < n_steps

        def body_fn(s_ref):
          @pl.when(has_next)
          def _():
            plgpu.barrier_wait(k_full.at[nslot])
            plgpu.wgmma(s_ref, q_smem, k_smem.at[nslot].T)

          acc_, m_, l_, p = softmax(j, s, acc, m, l, masked)
          plgpu.barrier_wait(v_full.at[slot])

          def pv_fn(o_acc):
            plgpu.wgmma(o_acc, p, v_smem.at[slot])

          acc_ = pl.run_state(pv_fn)(plgpu.ACC.init(acc_))  # waits for both GEMMs
          return acc_, m_, l_, s_ref[...]

        acc, m, l, s = pl.run_scoped(body_fn, plgpu.ACC((bq, bkv), jnp.float32))
        plgpu.barrier_arrive(v_free.at[wg * stages + slot])
        plgpu.barrier_arrive(k_free.at[wg * stages + nslot], predicate=has_next)
        return acc, m, l, s

      if tuning.hopper_overlap:
        plgpu.barrier_wait(k_full.at[0])
        s0 = qk(0)
        plgpu.barrier_arrive(k_free.at[wg * stages])
        carry = lax.fori_loop(
          0, n_unmasked, lambda j, c_: overlapped_step(j, c_, False), (acc, m, l, s0)
        )
        acc, m, l, _ = lax.fori_loop(
          n_unmasked, n_steps, lambda j, c_: overlapped_step(j, c_, True), carry
        )
      else:
        carry = lax.fori_loop(0, n_unmasked, lambda j, c_: step(j, c_, False), (acc, m, l))
        acc, m, l = lax.fori_loop(n_unmasked, n_steps, lambda j, c_: step(j, c_, True), carry)
      if tuning.hopper_pingpong:
        # Consumer 0 may have fewer steps (causal): keep the turn count of consumer 1.
        @pl.loop(n_steps, n_max)
        def _(j):
          handoff()
          handoff()

        pl.when(wg == 0)(handoff)

      q_smem[...] = (acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])).astype(dtype)
      lse_smem.at[wg][...] = m + jnp.log(l) * (1.0 / LN2)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(q0, bq), h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q0, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
      kv_h = lax.div(h, groups)
      # Steps each consumer visits: a slot is reloaded once every consumer that read it freed it.
      n_wg = [kv_steps(cta_q0 + w * bq)[0] for w in range(2)]

      @pl.loop(0, n_max)
      def _(j):
        slot = lax.rem(j, stages)
        rows = (b, pl.ds(j * bkv, bkv), kv_h)
        for src, dst, full, free in (
          (k_ref, k_smem, k_full, k_free),
          (v_ref, v_smem, v_full, v_free),
        ):
          for w in range(2):

            @pl.when((j >= stages) & (j - stages < n_wg[w]))
            def _():
              plgpu.barrier_wait(free.at[w * stages + slot])

          plgpu.copy_gmem_to_smem(src.at[rows], dst.at[slot], full.at[slot])

  swizzled = (
    plgpu.TilingTransform((8, SWIZZLE // jnp.dtype(dtype).itemsize)),
    plgpu.SwizzleTransform(SWIZZLE),
  )
  scratch = dict(
    qo_smem=plgpu.SMEM((2, bq, d), dtype, transforms=swizzled),
    lse_smem=plgpu.SMEM((2, bq), jnp.float32),
    k_smem=plgpu.SMEM((stages, bkv, d), dtype, transforms=swizzled),
    v_smem=plgpu.SMEM((stages, bkv, d), dtype, transforms=swizzled),
    q_full=plgpu.Barrier(num_barriers=2),
    k_full=plgpu.Barrier(num_barriers=stages),
    v_full=plgpu.Barrier(num_barriers=stages),
    k_free=plgpu.Barrier(num_barriers=2 * stages),
    v_free=plgpu.Barrier(num_barriers=2 * stages),
    turn=plgpu.Barrier(num_arrivals=2),
  )
  out_type = (
    jax.ShapeDtypeStruct(q.shape, dtype),
    jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32),
  )
  return plgpu.kernel(
    body,
    out_type=out_type,
    scratch_types=scratch,
    grid=(n_q, heads, batch),
    grid_names=("q", "h", "b"),
    num_threads=3,
    thread_name="wg",
    # Row reductions stay inside warps (WGMMA layout): no cross-warp reduction scratch.
    compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
    kernel_name="flash_fwd_hopper",
  )(q, k, v)
