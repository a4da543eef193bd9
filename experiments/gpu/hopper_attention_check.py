"""Checks and times the Hopper (Mosaic GPU) flash-attention forward on one sm90 GPU, in one process.

For each Hopper tuning of pallas_kernels/flash_attention/hopper.py (CANDIDATES, the defaults first):
1. correctness on 2 x 1000 x 4 x 128 bf16 with GQA 4/2, causal and not: o and lse of
   flash_attention(hopper=True) against the float32 reference (attnzoo.ops.softmax_attention),
   and dq/dk/dv (Hopper forward + Triton backward) against the reference's gradients;
2. forward time at bf16 B x T x H x D = 4 x 4096 x 16 x 128 and 1 x 16384 x 16 x 128, causal
   and not, next to our Triton forward (hopper=False) and cuDNN
   (jax.nn.dot_product_attention(implementation="cudnn")) timed once in the same run:
   ms, TFLOP/s (4*B*H*T^2*D, halved for causal), the ratio to cuDNN (cuDNN time / ours:
   >1 = faster than cuDNN), and the relative difference of o from cuDNN's.
Every config runs inside try/except (the error's first lines are printed), so one compile
failure leaves the rest. A summary goes to stdout and, when $OUT is set, is appended to
$OUT/hopper_check.json (a list of runs). About 2-3 minutes on an H200.

  GPU:  PYTHONPATH=. python3 experiments/gpu/hopper_attention_check.py
  options: --only default,s3 (config names) --budget 200 (seconds; later configs skipped)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.bench.timing import median_seconds
from attnzoo.ops.softmax_attention import reference
from pallas_kernels.flash_attention import flash_attention, hopper

H, D = 16, 128
SHAPES = [(4, 4096), (1, 16384)]
CONFIGS = list(hopper.CANDIDATES.items())  # (name, Tuning): the defaults first
CHECK = dict(batch=2, t=1000, heads=4, kv_heads=2)  # correctness shape (GQA 4/2, odd T)


def first_lines(e, n=6):
  text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
  text = [
    line for line in text if line.strip() and not line.startswith(("-----", "For simplicity"))
  ]
  return "\n".join(text[:n])


def rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def check_inputs():
  c = CHECK
  ks = jax.random.split(jax.random.key(1), 5)
  q = jax.random.normal(ks[0], (c["batch"], c["t"], c["heads"], D)).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (c["batch"], c["t"], c["kv_heads"], D)).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (c["batch"], c["t"], c["kv_heads"], D)).astype(jnp.bfloat16)
  do = jax.random.normal(ks[3], (c["batch"], c["t"], c["heads"], D), jnp.float32)
  dlse = jax.random.normal(ks[4], (c["batch"], c["t"], c["heads"]), jnp.float32)
  return q, k, v, do, dlse


def value_and_grads(attn, q, k, v, do, dlse, causal):
  def loss(q, k, v):
    o, lse = attn(q, k, v, scale=D**-0.5, causal=causal, return_lse=True)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(lse * dlse), (o, lse)

  (_, (o, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return o, lse, grads


@functools.cache
def reference_results(causal):
  q, k, v, do, dlse = check_inputs()
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    return value_and_grads(reference, f32(q), f32(k), f32(v), do, dlse, causal)


def correctness(cfg):
  """{causal: {o, lse, dq, dk, dv relative errors}} of flash_attention(hopper=True)."""
  q, k, v, do, dlse = check_inputs()
  out = {}
  for causal in (True, False):
    attn = functools.partial(flash_attention, hopper=True, tuning=cfg)
    o, lse, grads = value_and_grads(attn, q, k, v, do, dlse, causal)
    ro, rlse, rgrads = reference_results(causal)
    errs = dict(o=rel(o, ro), lse=rel(lse, rlse))
    errs.update({n: rel(g, rg) for n, g, rg in zip(("dq", "dk", "dv"), grads, rgrads)})
    errs["ok"] = bool(all(np.isfinite(x) and x <= 1e-2 for x in errs.values()))
    out["causal" if causal else "full"] = errs
  return out


def big_inputs(b, t):
  ks = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(kk, (b, t, H, D), jnp.float32).astype(jnp.bfloat16) for kk in ks]


def forward_fn(impl, causal, cfg=None):
  scale = D**-0.5
  if impl == "cudnn":
    return jax.jit(
      lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation="cudnn"
      )
    )
  return jax.jit(
    functools.partial(
      flash_attention, scale=scale, causal=causal, hopper=impl == "hopper", tuning=cfg
    )
  )


def flops(b, t, causal):
  return 4 * b * H * t * t * D / (2 if causal else 1)


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--only", default="", help="comma-separated config names (default: all)")
  p.add_argument(
    "--budget", type=float, default=200.0, help="seconds after which no further config starts"
  )
  args = p.parse_args(argv)
  start = time.perf_counter()
  device = jax.devices()[0]
  try:  # JAX's own Mosaic attention refuses causal on CUDA 12.8-12.9.0 (a ptxas miscompile)
    from jax._src.lib import cuda_versions

    cuda = (cuda_versions.cuda_runtime_get_version(), cuda_versions.cuda_compiled_version())
  except Exception:  # pylint: disable=broad-except
    cuda = "?"
  print(
    f"device: {device.device_kind} (cc {getattr(device, 'compute_capability', '?')}), "
    f"jax {jax.__version__}, CUDA runtime/compiled {cuda}",
    flush=True,
  )
  configs = [(n, c) for n, c in CONFIGS if not args.only or n in args.only.split(",")]
  cases = [(b, t, causal) for b, t in SHAPES for causal in (True, False)]
  inputs = {(b, t): big_inputs(b, t) for b, t in SHAPES}
  summary = dict(
    device=device.device_kind,
    jax=jax.__version__,
    cuda=str(cuda),
    H=H,
    D=D,
    dtype="bfloat16",
    anchors={},
    configs={},
  )

  # Anchors, once: our Triton forward and cuDNN (and cuDNN's o, to compare against).
  cudnn_out = {}
  for b, t, causal in cases:
    name = f"{'causal' if causal else 'full'} {b}x{t}"
    for impl in ("triton", "cudnn"):
      row = {}
      try:
        fn = forward_fn(impl, causal)
        sec = median_seconds(fn, *inputs[b, t])
        row = dict(ms=sec * 1e3, tflops=flops(b, t, causal) / sec / 1e12)
        if impl == "cudnn":
          cudnn_out[b, t, causal] = fn(*inputs[b, t])
      except Exception as e:
        row = dict(error=first_lines(e))
      summary["anchors"][f"{impl} {name}"] = row
      print(
        f"[anchor] {impl:6s} {name:14s} "
        + (
          f"{row['ms']:8.3f} ms {row['tflops']:6.0f} TFLOP/s"
          if "ms" in row
          else f"ERROR {row['error']}"
        ),
        flush=True,
      )

  for cname, cfg in configs:
    if time.perf_counter() - start > args.budget:
      print(f"[{cname}] skipped: --budget {args.budget:.0f} s used up", flush=True)
      summary["configs"][cname] = dict(config=dataclasses.asdict(cfg), skipped=True)
      continue
    res = dict(config=dataclasses.asdict(cfg), cases={})
    print(f"\n[{cname}] {cfg}", flush=True)
    try:
      res["correctness"] = correctness(cfg)
      for k, errs in res["correctness"].items():
        print(
          f"  check {k:6s} "
          + " ".join(f"{n}={errs[n]:.1e}" for n in ("o", "lse", "dq", "dk", "dv"))
          + ("  OK" if errs["ok"] else "  FAIL (tol 1e-2)"),
          flush=True,
        )
    except Exception as e:
      res["correctness"] = dict(error=first_lines(e))
      print(f"  check ERROR {first_lines(e)}", flush=True)
    for b, t, causal in cases:
      name = f"{'causal' if causal else 'full'} {b}x{t}"
      try:
        fn = forward_fn("hopper", causal, cfg)
        sec = median_seconds(fn, *inputs[b, t])
        row = dict(ms=sec * 1e3, tflops=flops(b, t, causal) / sec / 1e12)
        for impl in ("cudnn", "triton"):
          anchor = summary["anchors"].get(f"{impl} {name}", {})
          if "ms" in anchor:
            row[f"vs_{impl}"] = anchor["ms"] / row["ms"]
        if (b, t, causal) in cudnn_out:
          o = fn(*inputs[b, t])
          row["relerr_vs_cudnn"] = rel(
            o.astype(jnp.float32), cudnn_out[b, t, causal].astype(jnp.float32)
          )
        print(
          f"  {name:14s} {row['ms']:8.3f} ms {row['tflops']:6.0f} TFLOP/s  "
          f"vs cuDNN {row.get('vs_cudnn', float('nan')):.2f}x  "
          f"vs Triton {row.get('vs_triton', float('nan')):.2f}x  "
          f"o vs cuDNN {row.get('relerr_vs_cudnn', float('nan')):.1e}",
          flush=True,
        )
      except Exception as e:
        row = dict(error=first_lines(e))
        print(f"  {name:14s} ERROR {first_lines(e)}", flush=True)
      res["cases"][name] = row
    summary["configs"][cname] = res

  # Best config per case, by time.
  print("\nsummary (TFLOP/s, x cuDNN):", flush=True)
  for b, t, causal in cases:
    name = f"{'causal' if causal else 'full'} {b}x{t}"
    timed = [
      (r["cases"][name]["ms"], n)
      for n, r in summary["configs"].items()
      if "ms" in r.get("cases", {}).get(name, {})
    ]
    line = f"  {name:14s} cuDNN {summary['anchors'].get(f'cudnn {name}', {}).get('tflops', 0):5.0f}"
    line += f"  Triton {summary['anchors'].get(f'triton {name}', {}).get('tflops', 0):5.0f}"
    if timed:
      ms, best = min(timed)
      r = summary["configs"][best]["cases"][name]
      d = summary["configs"].get("default", {}).get("cases", {}).get(name, {})
      if "tflops" in d:
        line += f"  Hopper default {d['tflops']:5.0f} ({d.get('vs_cudnn', float('nan')):.2f}x)"
      line += f"  best {best} {r['tflops']:5.0f} ({r.get('vs_cudnn', float('nan')):.2f}x)"
    print(line, flush=True)
  summary["seconds"] = time.perf_counter() - start
  print(f"total {summary['seconds']:.0f} s", flush=True)
  if os.environ.get("OUT"):
    path = os.path.join(os.environ["OUT"], "hopper_check.json")
    runs = []
    if os.path.exists(path):
      try:
        with open(path) as f:
          runs = json.load(f)
      except (OSError, ValueError):
        runs = []
    runs = runs if isinstance(runs, list) else [runs]
    runs.append(summary)
    with open(path, "w") as f:
      json.dump(runs, f, indent=1)
    print(f"wrote {path}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
