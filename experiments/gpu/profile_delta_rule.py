"""Times each pallas_call of the delta-rule kernels (pallas_kernels/delta_rule) on one GPU.

Gated delta rule (Gated DeltaNet, Yang et al. 2024), bf16, H=16, K=V=128, chunk 64, at
B x T = 4 x 4096 and 1 x 16384: every kernel of the forward and the backward jitted alone on
realistic prepared inputs, the differentiable op's forward and forward+backward, and a small
sweep of Triton launch knobs (Tuning) per kernel. Each time is attnzoo.bench.timing's
median over timed batches after a warm-up. Prints a markdown table and writes
it to --out. About 2 minutes on one H200 (each Triton compile takes 0.3-3 s).

  GPU:  PYTHONPATH=. python3 experiments/gpu/profile_delta_rule.py --out $OUT/profile_delta_rule.md
  CPU check:  PYTHONPATH=. .venv/bin/python experiments/gpu/profile_delta_rule.py --interpret --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from attnzoo.bench.timing import median_seconds
from pallas_kernels.delta_rule import Tuning, calls, chunked_jnp, default_tuning, delta_rule

H, D = 16, 128
SHAPES = [(4, 4096), (1, 16384)]
# Sweep: (kernel, overrides of the default Tuning); the defaults are timed in the main rows.
SWEEP = [
  ("wy", dict(wy=(4, 2))),
  ("wy", dict(wy=(8, 3))),
  ("state", dict(state_block_v=64)),
  ("state", dict(state_block_v=32)),
  ("state", dict(state_block_v=16)),
  ("state", dict(state=(4, 2))),
  ("state", dict(state=(8, 3))),
  ("wu", dict(wu=(4, 3))),
  ("wu", dict(wu=(4, 2))),
  ("dv_local", dict(dv_local=(4, 3))),
  ("dv_local", dict(dv_local=(8, 2))),
  ("dstate", dict(dstate_block_v=64)),
  ("dstate", dict(dstate_block_v=32)),
  ("dstate", dict(dstate_block_v=16)),
  ("dstate", dict(dstate=(4, 3))),
  ("dstate", dict(dstate=(8, 2))),
  ("grad_qk", dict(grad_qk=(4, 3))),
  ("grad_qk", dict(grad_qk=(8, 2))),
  ("grad_qk", dict(grad_block_k=128, grad_qk=(4, 2))),
  ("grad_qk", dict(grad_block_k=128, grad_qk=(8, 3))),
  ("grad_qk", dict(grad_block_v=32)),
  ("grad_wy", dict(grad_wy=(8, 2))),
  ("grad_wy", dict(grad_wy=(4, 3))),
]


def timed(fn, args):
  """(median ms per call (attnzoo.bench.timing), seconds for the first call incl. compile)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  return 1e3 * median_seconds(fn, *args), first


def make_inputs(b, t, d, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (b, t, H, d), dtype)
  k = jax.random.normal(ks[1], (b, t, H, d), jnp.float32)
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, H, d), dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, H)))
  log_decay = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, H)) + 3.0)
  do = jax.random.normal(ks[5], (b, t, H, d), dtype)
  return q, k, v, beta, log_decay, do


class Stages:
  """The single-kernel calls on one problem; run once in order at construction so that every
  kernel later sees realistic inputs (the outputs of the kernels before it)."""

  KERNELS = ("wy", "wy_t", "state", "output", "wu", "dv_local", "dstate", "grad_qk", "grad_wy")
  FORWARD = ("wy_t", "state", "output")  # the forward of training, which stores T
  BACKWARD = ("wu", "state", "dv_local", "dstate", "grad_qk", "grad_wy")

  def __init__(self, q, k, v, beta, log_decay, do, *, chunk, interpret):
    self.chunk, self.interpret = chunk, interpret
    self.scale = q.shape[-1] ** -0.5
    beta_p, g, g0, _ = chunked_jnp.prepare_gates(beta, log_decay, None, chunk)
    b, _, h, d = q.shape
    s0 = jnp.zeros((b, h, d, v.shape[-1]), jnp.float32)
    self.x = dict(q=q, k=k, v=v, beta=beta_p, g=g, g0=g0, s0=s0, do=do, dsf=jnp.zeros_like(s0))
    self.tuning = default_tuning(b, h, v.shape[-1])
    self.default = self.calls(self.tuning)
    self.config = {n: "default" for n in self.KERNELS}
    self.config["state"] = f"default (block_v={self.tuning.state_block_v})"
    self.config["dstate"] = f"default (block_v={self.tuning.dstate_block_v})"
    self.compile_s = {}
    for name in self.KERNELS:
      fn, names, outs = self.default[name]
      t0 = time.perf_counter()
      for n, y in zip(outs, jax.block_until_ready(fn(*self.args(names)))):
        self.x.setdefault(n, y)
      self.compile_s[name] = time.perf_counter() - t0

  def args(self, names):
    return [self.x[n] for n in names]

  def calls(self, tuning):
    """name -> (jitted fn, argument names, output names)."""
    kern = calls.Kernels(
      self.x["q"],
      self.x["v"],
      chunk=self.chunk,
      gated=True,
      segmented=False,
      tuning=tuning,
      interpret=self.interpret,
    )
    scale = self.scale
    specs = {
      "wy": (lambda k, v, beta, *gs: kern.wy(k, v, beta, gs), ("k", "v", "beta"), ("w", "u_tilde")),
      "wy_t": (
        lambda k, v, beta, *gs: kern.wy(k, v, beta, gs, with_t=True),
        ("k", "v", "beta"),
        ("w", "u_tilde", "t"),
      ),
      "wu": (
        lambda k, v, beta, t, *gs: kern.wu(k, v, beta, t, gs),
        ("k", "v", "beta", "t"),
        ("w", "u_tilde"),
      ),
      "state": (
        lambda w, ut, k, s0, *gs: kern.states(w, ut, k, s0, gs),
        ("w", "u_tilde", "k", "s0"),
        ("h", "u", "final"),
      ),
      "output": (
        lambda q, k, h, u, *gs: (kern.output(q, k, h, u, gs, scale, u.dtype),),
        ("q", "k", "h", "u"),
        ("o",),
      ),
      "dv_local": (
        lambda q, k, do, *gs: (kern.dv_local(q, k, do, gs, scale),),
        ("q", "k", "do"),
        ("dvl",),
      ),
      "dstate": (
        lambda q, k, w, do, dvl, dsf, *gs: kern.dstates(q, k, w, do, dvl, dsf, gs, scale),
        ("q", "k", "w", "do", "dvl", "dsf"),
        ("dh", "du", "ds0"),
      ),
      "grad_qk": (
        lambda q, k, h, dh, do, u, du, *gs: kern.grad_qk(q, k, h, dh, do, u, du, gs, scale),
        ("q", "k", "h", "dh", "do", "u", "du"),
        ("dq", "dk_part", "dw"),
      ),
      "grad_wy": (
        lambda k, v, beta, t, dw, du, dkp, *gs: kern.grad_wy(k, v, beta, t, dw, du, dkp, gs),
        ("k", "v", "beta", "t", "dw", "du", "dk_part"),
        ("dk", "dv", "dbeta"),
      ),
    }
    return {
      name: (jax.jit(fn), names + ("g", "g0"), outs) for name, (fn, names, outs) in specs.items()
    }


def op_calls(q, k, v, beta, log_decay, do, interpret):
  """The differentiable op: jitted forward and forward+backward (value and all gradients)."""
  scale = q.shape[-1] ** -0.5

  def fwd(q, k, v, beta, log_decay):
    return delta_rule(q, k, v, beta, scale=scale, log_decay=log_decay, interpret=interpret)[0]

  def loss(q, k, v, beta, log_decay):
    return jnp.sum(fwd(q, k, v, beta, log_decay).astype(jnp.float32) * do.astype(jnp.float32))

  return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None, help="markdown file to write the table to")
  p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU check)")
  p.add_argument("--tiny", action="store_true", help="B,T,D = 1,128,32 (CPU check)")
  p.add_argument("--no-sweep", action="store_true")
  a = p.parse_args()
  shapes, d = ([(1, 128)], 32) if a.tiny else (SHAPES, D)
  start = time.perf_counter()
  rows = []

  def row(shape, kind, name, config, fn, args, first=None):
    ms, first_call = timed(fn, args)
    first = first_call if first is None else first
    rows.append((shape, kind, name, config, ms, first))
    print(
      f"{shape} {kind:6} {name:10} {config:40} {ms:8.3f} ms  (first call {first:5.1f} s, "
      f"{time.perf_counter() - start:6.1f} s elapsed)",
      flush=True,
    )
    return ms

  for b, t in shapes:
    shape = f"{b}x{t}"
    inputs = make_inputs(b, t, d, jnp.bfloat16)
    op_fwd, op_fwdbwd = op_calls(*inputs, a.interpret)
    row(shape, "op", "fwd", "default", op_fwd, inputs[:5])
    row(shape, "op", "fwd+bwd", "default", op_fwdbwd, inputs[:5])
    st = Stages(*inputs, chunk=chunked_jnp.chunk_size_for(t), interpret=a.interpret)
    ms = {}
    for name in st.KERNELS:
      fn, names, _ = st.default[name]
      ms[name] = row(shape, "kernel", name, st.config[name], fn, st.args(names), st.compile_s[name])
    rows.append((shape, "sum", "fwd kernels (with T)", "", sum(ms[n] for n in st.FORWARD), None))
    rows.append(
      (shape, "sum", "fwd+bwd kernels", "", sum(ms[n] for n in st.FORWARD + st.BACKWARD), None)
    )
    if a.no_sweep:
      continue
    for name, over in SWEEP:
      fn, names, _ = st.calls(dataclasses.replace(st.tuning, **over))[name]
      config = ", ".join(f"{k}={v}" for k, v in over.items())
      row(shape, "sweep", name, config, fn, st.args(names))

  lines = [
    f"# Delta-rule Pallas kernels, {jax.devices()[0].device_kind}",
    "",
    f"Gated, bf16, H={H}, K=V={d}, chunk 64; median of timed batches (ms); "
    f"defaults: `{Tuning()}` (V blocks by shape); first call includes compilation.",
    "",
    "| B x T | kind | kernel | config | ms | first call s |",
    "|---|---|---|---|---|---|",
  ]
  lines += [
    f"| {s} | {k} | {n} | {c} | {ms:.3f} | {'' if f is None else f'{f:.1f}'} |"
    for s, k, n, c, ms, f in rows
  ]
  lines += ["", f"Total wall time {time.perf_counter() - start:.0f} s."]
  text = "\n".join(lines)
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
