"""Times the pieces of the linear-attention kernel separately (GPU), for the H200 runs.

python experiments/gpu/profile_linear.py [--shapes 'B,T,H,D;...'] [--variants scalar,vector]
    [--tunings 'vector:block_v_out=128,num_warps=8;...'] [--package path/to/linear_attention]
Variants: linear (no decay), scalar, vector, rwkv6, den (no decay, v a ones column: the
normaliser's call). --package times another copy of the kernel package (a directory like
pallas_kernels/linear_attention/; an experiment).
Prints one line per (variant, tuning, shape, piece): milliseconds, median of repeated calls.
Pieces: the chunk-local cumsum of the log decay (kernel 0; with kd for vector decay), the
states kernel, the forward kernels (states + output), each backward kernel and all of them
(from the forward's states; the vector sub-block choice is not applied), and the public op
forward and forward+backward (the pullback of a bf16 cotangent, as the benchmark times it).
"""

import argparse
import dataclasses
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp

from attnzoo.bench.timing import median_seconds
from pallas_kernels import linear_attention as default_package


def load_kernel_package(name, path):
  """A copy of the kernel package (a directory), imported from `path` under `name`. Its
  modules import each other relatively, so the copy runs its own."""
  spec = importlib.util.spec_from_file_location(
    name, os.path.join(path, "__init__.py"), submodule_search_locations=[path]
  )
  package = importlib.util.module_from_spec(spec)
  sys.modules[name] = package  # dataclasses and relative imports look it up here
  spec.loader.exec_module(package)
  return package


def _tuning(lk, variant, text, b, h, d):
  """'field=value,...' -> Tuning over the variant's default (None: the default)."""
  if not text:
    return None
  kind = {"vector": "vector", "rwkv6": "vector", "scalar": "scalar"}.get(variant, "none")
  base = lk.default_tuning(b, h, d, 1 if variant == "den" else d, kind)
  fields = {}
  for item in text.split(","):
    name, value = item.split("=")
    fields[name] = None if value == "None" else int(value)
  return dataclasses.replace(base, **fields)


def _inputs(variant, b, t, h, d):
  ks = jax.random.split(jax.random.key(0), 6)
  bf = jnp.bfloat16
  q = (jax.random.normal(ks[0], (b, t, h, d)) * d**-0.5).astype(bf)
  k = (jax.random.normal(ks[1], (b, t, h, d)) * d**-0.5).astype(bf)
  v = jax.random.normal(ks[2], (b, t, h, d)).astype(bf)
  if variant == "den":
    v = jnp.ones((b, t, h, 1), bf)
  g = bonus = None
  if variant == "scalar":
    g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h))) * 0.1
  elif variant in ("vector", "rwkv6"):
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, d))) / 16
  if variant == "rwkv6":
    bonus = jax.random.normal(ks[4], (h, d)) * 0.1
  do = jax.random.normal(ks[5], v.shape).astype(bf)
  return q, k, v, g, bonus, do


def _time(label, fn, *args):
  try:
    ms = median_seconds(fn, *args) * 1e3
    print(f"{label}: {ms:.3f} ms", flush=True)
  except Exception as e:  # keep going: one failing piece should not hide the others
    print(f"{label}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default="4,4096,16,128;1,16384,16,128")
  p.add_argument("--variants", default="scalar,vector")
  p.add_argument("--tunings", default="", help="'variant:field=value,...;...' extra tunings")
  p.add_argument("--interpret", action="store_true")
  p.add_argument("--package", default="", help="path of another copy of the kernel package")
  args = p.parse_args()
  lk = default_package
  if args.package:
    lk = load_kernel_package("kernel_under_test", args.package)
  extra = [c.split(":", 1) for c in args.tunings.split(";") if c]
  for shape in args.shapes.split(";"):
    b, t, h, d = (int(x) for x in shape.split(","))
    for variant in args.variants.split(","):
      q, k, v, g, bonus, do = _inputs(variant, b, t, h, d)
      scale = d**-0.5
      for text in [""] + [c for var, c in extra if var == variant]:
        tuning = _tuning(lk, variant, text, b, h, d)
        tag = f"{variant} {b}x{t} [{text or 'default'}]" + (" (package)" if args.package else "")
        st, a = lk.op.prepare(
          q,
          k,
          v,
          g,
          scale=scale,
          bonus=bonus,
          initial_state=None,
          segment_ids=None,
          tuning=tuning,
          interpret=args.interpret,
          out_dtype=None,
        )
        dhT = jnp.zeros(a["h0"].shape, jnp.float32)
        calls = lk.calls
        core_args = tuple(a[n] for n in calls.ARGS)
        if g is not None:
          _time(f"{tag}: chunk cumsum", jax.jit(lambda x: calls.with_cumsum(st, x)["G"]), core_args)
        a = calls.with_cumsum(st, core_args)
        _time(f"{tag}: states kernel", jax.jit(lambda a: calls.states(st, a)), a)
        _time(f"{tag}: forward kernels", jax.jit(lambda a: calls.forward(st, a)), a)
        hs, _ = jax.jit(lambda a: calls.states(st, a))(a)
        dstates = jax.jit(lambda a, do, hs: calls.dstates(st, a, do, dhT, hs))
        _time(f"{tag}: dstates kernel", dstates, a, do, hs)
        dhs, _, rs = dstates(a, do, hs)
        _time(f"{tag}: dv kernel", jax.jit(lambda a, do, dhs: calls.dv(st, a, do, dhs)), a, do, dhs)
        _time(
          f"{tag}: dqk kernel",
          jax.jit(lambda a, do, hs, dhs, rs: calls.dqk(st, a, do, hs, dhs, rs)),
          a,
          do,
          hs,
          dhs,
          rs,
        )
        _time(
          f"{tag}: backward kernels",
          jax.jit(lambda a, do, hs: calls.backward(st, a, do, dhT, hs)),
          a,
          do,
          hs,
        )

        def op(q, k, v, g):
          o, _ = lk.linear_attention(
            q, k, v, g, scale=scale, bonus=bonus, tuning=tuning, interpret=args.interpret
          )
          return o

        def fwdbwd(q, k, v, g, do):  # the benchmark's convention: the pullback of a bf16 do
          return jax.vjp(op, q, k, v, g)[1](do)

        _time(f"{tag}: op fwd", jax.jit(op), q, k, v, g)
        _time(f"{tag}: op fwdbwd", jax.jit(fwdbwd), q, k, v, g, do)


if __name__ == "__main__":
  main()
