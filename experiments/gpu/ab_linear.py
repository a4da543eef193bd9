"""A/B timing of copies of the linear-attention kernel module, in one process (GPU runs).

python experiments/gpu/ab_linear.py 'B,T,H,D;...' vector,rwkv6 [name=path/to/kernel.py ...]
    [--interpret]
Times the public op of each module (the tree's as "main", then each copy) and the pure-jnp
chunked form ("xla", once), forward and forward+backward (the pullback of a bf16 cotangent,
as `attnzoo bench linear`), on the benchmark's inputs; three rounds, the modules interleaved
within each round, so that drift between rounds hits every module alike. Prints one line per
module: the milliseconds of each round.
"""
import argparse

import jax

from attnzoo.bench.linear import _inputs, _jitted
from attnzoo.bench.timing import median_seconds
from attnzoo.ops.linear_attention import _augment
from pallas_kernels.linear_attention import kernel as main_module
from profile_linear import load_kernel_module  # this directory


def _functions(module, static, interpret):
  def fwd(q, k, v, d):
    o, _ = module.linear_attention(q, k, _augment(v, static.get("normalize", False)),
                                   d.get("log_decay"), scale=static["scale"],
                                   bonus=d.get("bonus"), interpret=interpret)
    return o

  def fwdbwd(q, k, v, d, do):
    o, pullback = jax.vjp(fwd, q, k, v, d)
    pad = [(0, 0)] * 3 + [(0, o.shape[-1] - do.shape[-1])]   # the normaliser's ones column
    return pullback(jax.numpy.pad(do, pad))
  return jax.jit(fwd), jax.jit(fwdbwd)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("shapes")
  p.add_argument("variants")
  p.add_argument("modules", nargs="*", help="name=path of a copy of the kernel module")
  p.add_argument("--interpret", action="store_true")
  args = p.parse_args()
  modules = {"main": main_module}
  modules.update((n, load_kernel_module(n, path)) for n, path in (m.split("=") for m in args.modules))
  for shape in args.shapes.split(";"):
    shape = tuple(int(x) for x in shape.split(","))
    for variant in args.variants.split(","):
      (q, k, v), d, static = _inputs(variant, *shape)
      do = jax.random.normal(jax.random.key(9), v.shape).astype(v.dtype)
      fns = {n: _functions(m, static, args.interpret) for n, m in modules.items()}
      fns["xla"] = (_jitted(variant, "xla", static, False), _jitted(variant, "xla", static, True))
      times = {n: ([], []) for n in fns}
      for round_ in range(3):
        for n, (fwd, fwdbwd) in fns.items():
          if n == "xla" and round_:
            continue
          times[n][0].append(median_seconds(fwd, q, k, v, d) * 1e3)
          times[n][1].append(median_seconds(fwdbwd, q, k, v, d, do) * 1e3)
      for n, (f, fb) in times.items():
        print(f"{variant} {'x'.join(map(str, shape))} {n:>14}: fwd "
              + " ".join(f"{x:.3f}" for x in f) + " | fwdbwd " + " ".join(f"{x:.3f}" for x in fb),
              flush=True)


if __name__ == "__main__":
  main()
