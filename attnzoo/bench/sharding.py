"""`attnzoo bench sharding`: context-parallel strategies, W = 1, 2, 4, 8 shards of the sequence.

For each family x strategy (softmax: ring, ring + zig-zag, all-gather KV; linear attention with
per-channel decay, gated delta rule and selective scan: LASP-2 all-gather, log-step ppermute
scan; short conv: halo; long conv: halo or all-gather) and each W: the forward+backward time
(median, attnzoo.bench.timing), the per-device memory of the compiled forward+backward
(arguments, temporaries: XLA's memory analysis) and the relative error of the outputs against
W = 1. On CPU it forces 8 host devices (XLA_FLAGS, set before the backend starts), so it runs
anywhere; CPU times say nothing about GPU or TPU interconnects. Writes
experiments/results/sharding/sharding_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re

FORCE = "--xla_force_host_platform_device_count"


def _devices(count: int):
  if FORCE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FORCE}={count}".strip()
  import jax

  return jax.devices()


def cases(b: int, t: int, h: int, d: int):
  """(family, strategy, plan options, fn, inputs) for every family x strategy."""
  import jax.numpy as jnp
  import numpy as np

  from attnzoo.ops import delta_rule, linear_attention, long_conv, selective_scan, short_conv

  sa = importlib.import_module("attnzoo.ops.softmax_attention")
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  q, k, v = normal(b, t, h, d), normal(b, t, h, d), normal(b, t, h, d)
  g = -jnp.abs(normal(b, t, h, d)) * 0.1
  beta = jnp.full((b, t, h), 0.5)
  kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  x, w, taps = normal(b, t, h * d), normal(4, h * d), normal(t, h * d) / t
  dt, A = normal(b, t, h * d), -jnp.exp(normal(h * d, 16))
  Bm, Cm = normal(b, t, 16), normal(b, t, 16)
  attend = lambda q, k, v: sa.softmax_attention(q, k, v, scale=d**-0.5, causal=True)
  out = [
    ("softmax", "ring", dict(attention="ring", zigzag=False), attend, (q, k, v)),
    ("softmax", "ring zig-zag", dict(attention="ring", zigzag=True), attend, (q, k, v)),
    ("softmax", "allgather_kv", dict(attention="allgather_kv", zigzag=True), attend, (q, k, v)),
  ]
  for state in ("allgather", "logscan"):
    out += [
      (
        "linear (GLA)",
        state,
        dict(state=state),
        lambda q, k, v, g: linear_attention.linear_attention(q, k, v, scale=d**-0.5, log_decay=g),
        (q, k, v, g),
      ),
      (
        "gated delta rule",
        state,
        dict(state=state),
        lambda q, k, v: delta_rule.delta_rule(
          q, k, v, beta, scale=d**-0.5, log_decay=g[..., 0], implementation="xla"
        ),
        (q, kn, v),
      ),
      (
        "selective scan",
        state,
        dict(state=state),
        lambda x, dt: selective_scan.selective_scan(x, dt, A, Bm, Cm),
        (x, dt),
      ),
    ]
  out += [
    ("short conv", "halo", {}, lambda x: short_conv.short_conv(x, w), (x,)),
    ("long conv", "all-gather", {}, lambda x: long_conv.long_conv(x, taps), (x,)),
  ]
  return out


def measure(devices, shards, family_cases, reps):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from attnzoo.bench.timing import median_seconds
  from attnzoo.ops import context_parallel as cp

  rows, reference = [], {}
  for w in shards:
    mesh = Mesh(np.array(devices[:w]).reshape(1, 1, w, 1), ("data", "fsdp", "context", "tensor"))
    for family, strategy, options, fn, inputs in family_cases:
      placed = [jax.device_put(a, NamedSharding(mesh, P(None, "context"))) for a in inputs]
      plan = cp.Plan(mesh, **options)

      def loss(*a, fn=fn, plan=plan):
        with cp.use(plan):
          return jnp.sum(fn(*a) ** 2)

      step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(inputs)))))
      forward = jax.jit(lambda *a, fn=fn, plan=plan: cp_call(plan, fn, *a))
      memory = step.lower(*placed).compile().memory_analysis()
      out = np.asarray(forward(*placed), np.float64)
      key = (family, strategy)
      reference.setdefault(key, out)
      error = float(np.linalg.norm(out - reference[key]) / np.linalg.norm(reference[key]))
      seconds = median_seconds(step, *placed, reps=reps)
      rows.append(
        dict(
          family=family,
          strategy=strategy,
          shards=w,
          ms=seconds * 1e3,
          argument_mb=memory.argument_size_in_bytes / 2**20,
          temp_mb=memory.temp_size_in_bytes / 2**20,
          rel_error=error,
        )
      )
      print(
        f"{family:18s} {strategy:14s} W={w}: {seconds * 1e3:9.2f} ms  "
        f"args {rows[-1]['argument_mb']:8.3f} MiB  temp {rows[-1]['temp_mb']:8.3f} MiB  "
        f"err {error:.1e}",
        flush=True,
      )
  return rows


def cp_call(plan, fn, *args):
  from attnzoo.ops import context_parallel as cp

  with cp.use(plan):
    return fn(*args)


def to_markdown(rows, device, shape) -> str:
  lines = [
    f"# Context parallelism: forward+backward per strategy ({device})",
    "",
    f"Shapes: {shape}, float32. Memory per device from XLA's compiled memory analysis of the "
    "forward+backward; error: outputs against W = 1.",
    "",
    "| family | strategy | W | fwd+bwd ms | arguments MiB | temporaries MiB | rel. error |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['family']} | {r['strategy']} | {r['shards']} | {r['ms']:.2f} | "
      f"{r['argument_mb']:.3f} | {r['temp_mb']:.3f} | {r['rel_error']:.1e} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(prog="attnzoo bench sharding", description=__doc__)
  p.add_argument("--out-dir", default=os.path.join("experiments", "results", "sharding"))
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--head-dim", type=int, default=32)
  p.add_argument("--shards", default="1,2,4,8")
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args(argv)
  shards = [int(s) for s in args.shards.split(",")]
  devices = _devices(max(shards))
  import jax

  if max(shards) > len(devices):
    raise ValueError(f"--shards {args.shards} needs {max(shards)} devices; {len(devices)} found")
  device = devices[0].device_kind
  shape = dict(B=args.batch, T=args.seq_len, H=args.heads, D=args.head_dim)
  print(f"device: {device} x {len(devices)}, jax {jax.__version__}, {shape}", flush=True)
  family_cases = cases(args.batch, args.seq_len, args.heads, args.head_dim)
  rows = measure(devices, shards, family_cases, args.reps)
  os.makedirs(args.out_dir, exist_ok=True)
  name = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
  stem = os.path.join(args.out_dir, f"sharding_{name}")
  with open(stem + ".json", "w") as f:
    json.dump(dict(device=device, jax=jax.__version__, shape=shape, rows=rows), f, indent=1)
  md = to_markdown(rows, device, shape)
  with open(stem + ".md", "w") as f:
    f.write(md)
  print(md)
  return 0
