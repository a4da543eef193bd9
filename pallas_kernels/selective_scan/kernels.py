"""Kernel bodies of the chunked selective scan (Mamba, Gu & Dao 2023, "Mamba: Linear-Time
Sequence Modeling with Selective State Spaces"; the recurrence is in chunked_jnp.py).

One program owns one batch row and a block of BD channels, with the float32 state h [N, BD]
in registers (GPU) or VMEM (TPU). The scan over time is sequential (a chain of one
multiply-add per step: h_t = decay_t h_{t-1} + u_t); the per-step loads and exponentials do
not depend on h, so each chunk of C steps is unrolled in Python, all its loads come first and
all its stores last, and the compiler can issue them ahead of the chain (loads interleaved
with stores that might alias them serialised every step on the memory latency: 3.5 ms for
the forward at B=4, T=4096, D=2048 on an H200). Nothing of size [T, D, N] ever reaches HBM:
  1. `forward_kernel`: reads x, delta, B, C once, writes y once, and stores the state entering
     each chunk (hs [B, T/C, N, D] float32: 1/C of the states) for the backward.
  2. `backward_kernel`, chunks in reverse: recomputes the chunk's C states from hs (kept in
     registers), then walks back through them carrying dh (the gradient of the state):
       dh += C_t dy_t;  dC_t = h_t dy_t;  dB_t = dh (dt_t x_t);  du_t = B_t . dh
       dx_t = D dy_t + dt_t du_t;  g = dh * h_{t-1} * decay_t;  dA += dt_t g
       ddt_t = x_t du_t + A . g  (times sigmoid(delta + bias) under softplus);  dh *= decay_t
     dB, dC are partial sums over the program's channels ([B, D/BD, T/C, N, C], summed in
     XLA) and dA one partial per chunk ([B, T/C, N, D]); dD and the delta-bias gradient are
     sums over (B, T) done in XLA.

Layouts (op.py prepares them): x, delta, y, dx, ddelta [B, Tp, Dp] (rows of BD channels);
B, C (and the segment keep mask) chunk-major and transposed, [B, T/C, N, C], so one step's
column is a strided [N] load; A^T [N, Dp]; the delta bias and D as [1, Dp]. Vectors are 1-D
and broadcast with [:, None] / [None, :], as in the other kernel packages. The sequential loop
is `pallas_kernels.common`'s: a fori_loop over the chunks of whole-sequence blocks on GPU, a
grid axis walking one-chunk blocks on TPU (n_chunks = 1 there).
"""

from __future__ import annotations

import jax.numpy as jnp

F32 = jnp.float32


def _softplus(z):
  """softplus with mamba_ssm's threshold (identity above 20)."""
  return jnp.where(z > 20.0, z, jnp.log1p(jnp.exp(jnp.minimum(z, 20.0))))


def _unpack(refs, n_in, segmented):
  ins, rest = list(refs[:n_in]), list(refs[n_in:])
  keep = rest.pop(0) if segmented else None
  return ins, keep, rest


def _chunk_inputs(n, chunk, refs, keep_ref, bias, softplus):
  """The inputs of chunk n's steps, all loaded before any store of the chunk (the compiler
  may not move a load past a store that could alias it, so loads interleaved with stores
  would serialise each step on the memory latency). Per step: x, the pre-softplus z, dt
  [BD]; B_t, C_t [N]; keep [N] or None."""
  x_ref, dt_ref, bt_ref, ct_ref = refs
  steps = []
  for i in range(chunk):
    t = n * chunk + i
    x = x_ref[t, :].astype(F32)
    z = dt_ref[t, :].astype(F32) + bias
    dt = _softplus(z) if softplus else z
    b = bt_ref[n, :, i].astype(F32)
    c = ct_ref[n, :, i].astype(F32)
    keep = None if keep_ref is None else keep_ref[n, :, i]
    steps.append((x, z, dt, b, c, keep))
  return steps


def _decay(dt, a, keep):
  decay = jnp.exp(dt[None, :] * a)
  return decay if keep is None else decay * keep[:, None]


def forward_kernel(*refs, chunk, n_chunks, softplus, segmented, loop):
  ins, keep_ref, outs = _unpack(refs, 7, segmented)
  x_ref, dt_ref, bias_ref, a_ref, dskip_ref, bt_ref, ct_ref = ins
  h0_ref, y_ref, hs_ref, hT_ref = outs
  a = a_ref[...]
  bias = bias_ref[0, :]
  dskip = dskip_ref[0, :]
  seq = (x_ref, dt_ref, bt_ref, ct_ref)

  def body(n, h):
    steps = _chunk_inputs(n, chunk, seq, keep_ref, bias, softplus)
    hs_ref[n, :, :] = h
    ys = []
    for x, _, dt, b, c, keep in steps:
      h = _decay(dt, a, keep) * h + (dt * x)[None, :] * b[:, None]
      ys.append(jnp.sum(h * c[:, None], axis=0) + dskip * x)
    for i, y in enumerate(ys):
      y_ref[n * chunk + i, :] = y.astype(y_ref.dtype)
    return h

  loop(body, n_chunks, h0_ref, hT_ref)


def backward_kernel(*refs, chunk, n_chunks, softplus, segmented, loop):
  ins, keep_ref, outs = _unpack(refs, 9, segmented)
  x_ref, dt_ref, bias_ref, a_ref, dskip_ref, bt_ref, ct_ref, hs_ref, dy_ref = ins
  dhT_ref, dx_ref, ddt_ref, dbt_ref, dct_ref, da_ref, dh0_ref = outs
  a = a_ref[...]
  bias = bias_ref[0, :]
  dskip = dskip_ref[0, :]
  seq = (x_ref, dt_ref, bt_ref, ct_ref)

  def body(k, dh):
    n = n_chunks - 1 - k
    steps = _chunk_inputs(n, chunk, seq, keep_ref, bias, softplus)
    h = hs_ref[n, :, :]
    states = [h]
    for x, _, dt, b, _, keep in steps:  # recompute the chunk's states (registers)
      h = _decay(dt, a, keep) * h + (dt * x)[None, :] * b[:, None]
      states.append(h)
    da = jnp.zeros_like(a)
    # each step's gradients are stored as soon as they are formed: holding the chunk's
    # gradients for stores at its end (like the forward's outputs) measured slower on an H200
    # (forward+backward 14.4 ms against 10.5 ms at B=4, T=4096, D=2048, N=16)
    for i in reversed(range(chunk)):
      x, z, dt, b, c, keep = steps[i]
      t = n * chunk + i
      dy = dy_ref[t, :].astype(F32)
      dh = dh + c[:, None] * dy[None, :]
      dct_ref[n, :, i] = jnp.sum(states[i + 1] * dy[None, :], axis=1)
      dbt_ref[n, :, i] = jnp.sum(dh * (dt * x)[None, :], axis=1)
      du = jnp.sum(dh * b[:, None], axis=0)
      decay = _decay(dt, a, keep)
      g = dh * states[i] * decay
      da = da + g * dt[None, :]
      ddt = x * du + jnp.sum(g * a, axis=0)
      if softplus:
        ddt = ddt / (1.0 + jnp.exp(-z))
      dx_ref[t, :] = (dskip * dy + dt * du).astype(dx_ref.dtype)
      ddt_ref[t, :] = ddt.astype(ddt_ref.dtype)
      dh = dh * decay
    da_ref[n, :, :] = da
    return dh

  loop(body, n_chunks, dhT_ref, dh0_ref)
