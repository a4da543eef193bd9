"""A/B timing of copies of the linear-attention kernel package, in one process (GPU runs).

python experiments/gpu/ab_linear.py 'B,T,H,D;...' vector,rwkv6 [name=path/to/linear_attention ...]
    [--interpret]
Times the public op of each package (the tree's as "main", then each copy: a directory like
pallas_kernels/linear_attention/) and the pure-jnp chunked form ("xla", once), forward and
forward+backward (the pullback of a bf16 cotangent, as `attnzoo bench linear`), on the
benchmark's inputs; three rounds, the packages interleaved within each round, so that drift
between rounds hits every package alike. Prints one line per package: the milliseconds of each
round.
"""

import argparse

import jax
from profile_linear import load_kernel_package  # this directory

from attnzoo.bench.linear import _inputs, _jitted
from attnzoo.bench.timing import median_seconds
from attnzoo.ops.linear_attention import _augment
from pallas_kernels import linear_attention as main_package


def _functions(package, static, interpret):
  def fwd(q, k, v, d):
    o, _ = package.linear_attention(
      q,
      k,
      _augment(v, static.get("normalize", False)),
      d.get("log_decay"),
      scale=static["scale"],
      bonus=d.get("bonus"),
      interpret=interpret,
    )
    return o

  def fwdbwd(q, k, v, d, do):
    o, pullback = jax.vjp(fwd, q, k, v, d)
    pad = [(0, 0)] * 3 + [(0, o.shape[-1] - do.shape[-1])]  # the normaliser's ones column
    return pullback(jax.numpy.pad(do, pad))

  return jax.jit(fwd), jax.jit(fwdbwd)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("shapes")
  p.add_argument("variants")
  p.add_argument("packages", nargs="*", help="name=path of a copy of the kernel package")
  p.add_argument("--interpret", action="store_true")
  args = p.parse_args()
  packages = {"main": main_package}
  packages.update(
    (n, load_kernel_package(n, path)) for n, path in (m.split("=") for m in args.packages)
  )
  for shape in args.shapes.split(";"):
    shape = tuple(int(x) for x in shape.split(","))
    for variant in args.variants.split(","):
      (q, k, v), d, static = _inputs(variant, *shape)
      do = jax.random.normal(jax.random.key(9), v.shape).astype(v.dtype)
      fns = {n: _functions(m, static, args.interpret) for n, m in packages.items()}
      fns["xla"] = (_jitted(variant, "xla", static, False), _jitted(variant, "xla", static, True))
      times = {n: ([], []) for n in fns}
      for round_ in range(3):
        for n, (fwd, fwdbwd) in fns.items():
          if n == "xla" and round_:
            continue
          times[n][0].append(median_seconds(fwd, q, k, v, d) * 1e3)
          times[n][1].append(median_seconds(fwdbwd, q, k, v, d, do) * 1e3)
      for n, (f, fb) in times.items():
        print(
          f"{variant} {'x'.join(map(str, shape))} {n:>14}: fwd "
          + " ".join(f"{x:.3f}" for x in f)
          + " | fwdbwd "
          + " ".join(f"{x:.3f}" for x in fb),
          flush=True,
        )


if __name__ == "__main__":
  main()
