"""Times each pallas_call of the linear-attention kernel separately (GPU), for the H200 runs.

python experiments/gpu/profile_linear.py [--shapes 'B,T,H,D;...'] [--variants scalar,vector]
Prints one line per (variant, shape, kernel): milliseconds, median of repeated calls.
"""
import argparse
import jax
import jax.numpy as jnp

from attnzoo.bench.timing import median_seconds
from pallas_kernels.linear_attention import kernel as lk


def median_ms(fn, *args):
  return median_seconds(fn, *args) * 1e3


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default="4,4096,16,128;1,16384,16,128")
  p.add_argument("--variants", default="scalar,vector")
  p.add_argument("--interpret", action="store_true")
  args = p.parse_args()
  for shape in args.shapes.split(";"):
    b, t, h, d = (int(x) for x in shape.split(","))
    for variant in args.variants.split(","):
      ks = jax.random.split(jax.random.key(0), 5)
      bf = jnp.bfloat16
      q = (jax.random.normal(ks[0], (b, t, h, d)) * d ** -0.5).astype(bf)
      k = (jax.random.normal(ks[1], (b, t, h, d)) * d ** -0.5).astype(bf)
      v = jax.random.normal(ks[2], (b, t, h, d)).astype(bf)
      gshape = (b, t, h) if variant == "scalar" else (b, t, h, d)
      g = jax.nn.log_sigmoid(jax.random.normal(ks[3], gshape)) / 16
      cfg = lk.default_config(b, h, d, d, variant)
      st = lk._Static(kind=variant, exclusive=False, segments=False, scale=d ** -0.5,
                      chunk=cfg.chunk, sub=cfg.sub if variant == "vector" else cfg.chunk,
                      interpret=args.interpret, block_k=min(cfg.block_k, d),
                      block_v=min(cfg.block_v, d), block_v_out=min(cfg.block_v_out, d), out_dtype=None, config=cfg)
      G = jnp.cumsum(g.reshape(b, t // cfg.chunk, cfg.chunk, *g.shape[2:]), 2).reshape(g.shape)
      a = dict(q=q, k=k, v=v, G=G, Gq=G, h0=jnp.zeros((b, h, d, d), jnp.float32),
               seg=None, m0=None, mk=None)
      do = jax.random.normal(ks[4], v.shape).astype(bf)
      dhT = jnp.zeros((b, h, d, d), jnp.float32)
      parts = {
          "states": jax.jit(lambda a: lk._states(st, a)),
          "forward (states+output)": jax.jit(lambda a: lk._forward(st, a)),
          "backward (states+dstates+grads)": jax.jit(lambda a, do, dhT: lk._backward(st, a, do, dhT)),
      }
      for name, fn in parts.items():
        call_args = (a, do, dhT) if name.startswith("backward") else (a,)
        try:
          ms = median_ms(fn, *call_args)
          print(f"{variant} {b}x{t}: {name}: {ms:.3f} ms", flush=True)
        except Exception as e:  # keep going: one failing kernel should not hide the others
          print(f"{variant} {b}x{t}: {name}: failed: {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
  main()
