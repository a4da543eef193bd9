"""Times the delta-rule Pallas kernels against the pure-JAX chunked form on the local device.

  python -m pallas_kernels.delta_rule.benchmark [--shapes 4x4096x16x128,1x16384x16x128]
  python -m pallas_kernels.delta_rule.benchmark --breakdown   # time each kernel alone

Gated delta rule (GDN), bf16, L2-normalised keys. Prints the median milliseconds of forward
and forward+backward for "pallas" and "xla" (the chunked pure-JAX form), their agreement,
and forward timings of a few kernel block configurations.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.delta_rule import chunked_jnp, kernels


def _inputs(b, t, h, d, dtype):
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, t, h, d), jnp.float32)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (b, t, h, d), jnp.float32)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
  log_decay = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h)) + 3.0)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), beta, log_decay


def xla_delta_rule(q, k, v, beta, *, scale, log_decay=None):
  t = q.shape[1]
  chunk = chunked_jnp.chunk_size_for(t)
  beta_p, g, g0, run = chunked_jnp.prepare_gates(beta, log_decay, None, chunk)
  s0 = jnp.zeros(q.shape[:1] + q.shape[2:3] + (q.shape[-1], v.shape[-1]), jnp.float32)
  tp = beta_p.shape[-1]
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  o, final = chunked_jnp.chunked(pad(q), pad(k), pad(v), beta_p, g, g0, run, s0, scale=scale,
                                 chunk=chunk)
  return o[:, :t], final


def pallas_delta_rule(q, k, v, beta, *, scale, log_decay=None):
  return kernels.delta_rule(q, k, v, beta, scale=scale, log_decay=log_decay)


def median_ms(fn, *args, reps=7, inner=5):
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / inner * 1e3)
  return float(np.median(times))


def rel(x, ref):
  x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def run(shape, dtype=jnp.bfloat16, configs=True):
  b, t, h, d = shape
  scale = d ** -0.5
  args = _inputs(b, t, h, d, dtype)
  do = jax.random.normal(jax.random.PRNGKey(1), (b, t, h, d), jnp.float32).astype(dtype)
  print(f"--- {jax.devices()[0].device_kind}  B,T,H,D={shape}  {jnp.dtype(dtype).name}  gated",
        flush=True)
  results = {}
  outs = {}
  for name, impl in (("pallas", pallas_delta_rule), ("xla", xla_delta_rule)):
    fwd = jax.jit(lambda q, k, v, beta, ld, impl=impl: impl(q, k, v, beta, scale=scale,
                                                            log_decay=ld)[0])

    def loss(q, k, v, beta, ld, impl=impl):
      o = impl(q, k, v, beta, scale=scale, log_decay=ld)[0]
      return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

    fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    try:
      results[name, "fwd"] = median_ms(fwd, *args)
      print(f"{name:7s} fwd      {results[name, 'fwd']:8.3f} ms", flush=True)
      outs[name] = (fwd(*args), fwdbwd(*args))
      results[name, "fwdbwd"] = median_ms(fwdbwd, *args)
      print(f"{name:7s} fwd+bwd  {results[name, 'fwdbwd']:8.3f} ms", flush=True)
    except Exception as e:  # report and go on: one failure should not hide the rest
      print(f"{name:7s} FAILED: {type(e).__name__}: {str(e)[:1500]}", flush=True)
  if ("pallas", "fwd") in results and ("xla", "fwd") in results:
    print(f"speed-up pallas/xla: fwd {results['xla', 'fwd'] / results['pallas', 'fwd']:.2f}x",
          end="")
    if ("pallas", "fwdbwd") in results and ("xla", "fwdbwd") in results:
      print(f", fwd+bwd {results['xla', 'fwdbwd'] / results['pallas', 'fwdbwd']:.2f}x", end="")
    print()
  if "pallas" in outs and "xla" in outs:
    (op, gp), (ox, gx) = outs["pallas"], outs["xla"]
    errs = [rel(op, ox)] + [rel(a, c) for a, c in zip(gp, gx)]
    print("pallas vs xla rel. error  o, dq, dk, dv, dbeta, dlog_decay: "
          + ", ".join(f"{e:.1e}" for e in errs), flush=True)
  if configs:
    chunk = 64
    beta_p, g, g0, run_ids = chunked_jnp.prepare_gates(args[3], args[4], None, chunk)
    s0 = jnp.zeros((b, h, d, d), jnp.float32)
    ref = None
    for block_v, warps, stages in ((64, 4, 2), (32, 4, 2), (64, 8, 2), (128, 8, 2),
                                   (64, 4, 3)):
      fn = jax.jit(functools.partial(kernels.forward, scale=scale, chunk=chunk,
                                     block_v=block_v, num_warps=warps, num_stages=stages))
      try:
        ms = median_ms(fn, args[0], args[1], args[2], beta_p, g, g0, run_ids, s0)
        o = fn(args[0], args[1], args[2], beta_p, g, g0, run_ids, s0)[0]
        ref = o if ref is None else ref
        print(f"  kernel forward block_v={block_v:3d} num_warps={warps} num_stages={stages}:"
              f" {ms:8.3f} ms (rel. diff to first {rel(o, ref):.1e})", flush=True)
      except Exception as e:
        print(f"  kernel forward block_v={block_v} num_warps={warps}: FAILED "
              f"{type(e).__name__}: {str(e)[:300]}", flush=True)
  return results


def breakdown(shape, dtype=jnp.bfloat16):
  """Times each kernel alone (forward: wy, states, output; backward: dstates, grads) and a
  few backward configurations, to show where the time goes."""
  b, t, h, d = shape
  scale, chunk = d ** -0.5, 64
  q, k, v, beta, log_decay = _inputs(b, t, h, d, dtype)
  beta_p, g, g0, run_ids = chunked_jnp.prepare_gates(beta, log_decay, None, chunk)
  s0 = jnp.zeros((b, h, d, d), jnp.float32)
  do = jax.random.normal(jax.random.PRNGKey(1), v.shape, jnp.float32).astype(dtype)
  gates = [g, g0]
  calls = kernels._Calls(q, v, chunk=chunk, gated=True, segmented=False, interpret=False,
                         block_v=64, num_warps=4, num_stages=2)
  w, ut = jax.jit(lambda k, v, bt, g, g0: calls.wy(k, v, bt, [g, g0]))(k, v, beta_p, g, g0)
  st, u, _ = jax.jit(lambda *a: calls.states(*a[:4], list(a[4:])))(w, ut, k, s0, *gates)
  dst, du, _ = jax.jit(lambda *a: calls.dstates(*a[:5], list(a[5:]), scale))(
      q, k, w, do, s0, *gates)
  print(f"--- per-kernel times, B,T,H,D={shape} {jnp.dtype(dtype).name} gated", flush=True)
  parts = {
      "wy": (lambda k, v, bt, g, g0: calls.wy(k, v, bt, [g, g0]), (k, v, beta_p, g, g0)),
      "states": (lambda *a: calls.states(*a[:4], list(a[4:])), (w, ut, k, s0, *gates)),
      "output": (lambda *a: calls.output(*a[:4], list(a[4:]), scale, v.dtype),
                 (q, k, st, u, *gates)),
      "dstates": (lambda *a: calls.dstates(*a[:5], list(a[5:]), scale),
                  (q, k, w, do, s0, *gates)),
  }
  for warps in (4, 8):
    parts[f"grads(warps={warps})"] = (
        lambda *a, warps=warps: calls.grads(*a[:9], list(a[9:]), scale, warps),
        (q, k, v, beta_p, st, dst, do, u, du, *gates))
  for name, (fn, args) in parts.items():
    try:
      print(f"  {name:18s} {median_ms(jax.jit(fn), *args):8.3f} ms", flush=True)
    except Exception as e:
      print(f"  {name:18s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="4x4096x16x128,1x16384x16x128")
  parser.add_argument("--no-configs", action="store_true")
  parser.add_argument("--breakdown", action="store_true", help="per-kernel times instead")
  a = parser.parse_args()
  if a.breakdown:
    for s in a.shapes.split(","):
      breakdown(tuple(int(x) for x in s.split("x")))
    return
  for i, s in enumerate(a.shapes.split(",")):
    run(tuple(int(x) for x in s.split("x")), configs=not a.no_configs and i == 0)


if __name__ == "__main__":
  main()
