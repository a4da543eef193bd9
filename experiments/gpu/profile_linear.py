"""Times each pallas_call of the linear-attention kernel separately (GPU), for the H200 runs.

python experiments/gpu/profile_linear.py [--shapes 'B,T,H,D;...'] [--variants scalar,vector]
Prints one line per (variant, shape, kernel): milliseconds, median of repeated calls.
"""
import argparse
import jax
import jax.numpy as jnp

from attnzoo.bench.timing import median_seconds
from pallas_kernels.linear_attention import kernel as lk


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
      st, a = lk._prepare(q, k, v, g, scale=d ** -0.5, bonus=None, initial_state=None,
                          segment_ids=None, config=None, interpret=args.interpret,
                          out_dtype=None)
      do = jax.random.normal(ks[4], v.shape).astype(bf)
      dhT = jnp.zeros(a["h0"].shape, jnp.float32)
      parts = {
          "states": jax.jit(lambda a: lk._states(st, a)),
          "forward (states+output)": jax.jit(lambda a: lk._forward(st, a)),
          "backward (states+dstates+grads)": jax.jit(lambda a, do, dhT: lk._backward(st, a, do, dhT)),
      }
      for name, fn in parts.items():
        call_args = (a, do, dhT) if name.startswith("backward") else (a,)
        try:
          ms = median_seconds(fn, *call_args) * 1e3
          print(f"{variant} {b}x{t}: {name}: {ms:.3f} ms", flush=True)
        except Exception as e:  # keep going: one failing kernel should not hide the others
          print(f"{variant} {b}x{t}: {name}: failed: {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
  main()
