"""`attnzoo bench long_conv` (the long-convolution part of `attnzoo bench ssm`):

1. FFT long convolution (attnzoo.ops.long_conv, "fft") at B=4, T=4096 and 16384, C=2048, bf16
   inputs (float32 FFTs), forward and forward+backward, against XLA's direct depthwise
   convolution (lax.conv_general_dilated, a length-T kernel) measured in the same run.
2. Generation of 4,096 tokens through one Hyena long convolution (C=768, a random implicit
   filter: layers.ImplicitFilter with Zoology's w=1, emb_dim 3, MLP weights N(0, 1/fan_in);
   random filters with safari's Pile setting w=14, emb_dim 33 are noise-like and no low-order
   SSM fits them) in a greedy token loop (vocabulary 256: u_{t+1} = E[argmax(y_t R)]): the
   naive cache vs epoched FutureFill vs a distilled diagonal SSM (attnzoo.ops.conv_decode),
   with the next-token agreement of each against the naive tokens (teacher-forced on the
   naive inputs) and the distilled filter's relative error.

Writes experiments/results/kernels/long_conv_<device>.{md,json}; the functions `fft_rows` and
`generation_rows` are what `bench ssm` calls.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnzoo.bench.linear import device_name
from attnzoo.bench.timing import median_seconds
from attnzoo.ops import conv_decode as cd
from attnzoo.ops import diag_ssm as ssm_ops
from attnzoo.ops import long_conv as lc_ops

FFT_SHAPES = ((4, 4096, 2048), (4, 16384, 2048))


def _direct_conv(u, k):
  """XLA's depthwise convolution with a length-L causal kernel: u [B,T,C], k [L,C]."""
  steps, channels = k.shape
  rhs = k[::-1, None, :]  # [L, 1, C] (WIO), flipped: conv_general_dilated correlates
  y = lax.conv_general_dilated(
    u.astype(jnp.float32),
    rhs.astype(jnp.float32),
    window_strides=(1,),
    padding=((steps - 1, 0),),
    dimension_numbers=("NWC", "WIO", "NWC"),
    feature_group_count=channels,
  )
  return y.astype(u.dtype)


def _timed(fn, u, k, bwd):
  run = fn
  if bwd:
    run = jax.grad(lambda u, k: jnp.sum(fn(u, k).astype(jnp.float32)), argnums=(0, 1))
  return median_seconds(jax.jit(run), u, k, reps=5)


def fft_rows(shapes=FFT_SHAPES, dtype=jnp.bfloat16, direct_max_t: int = 4096) -> list[dict]:
  """FFT conv vs XLA's direct conv (the anchor, O(T^2 C): only up to direct_max_t tokens)."""
  rows = []
  for b, t, c in shapes:
    u = jax.random.normal(jax.random.key(0), (b, t, c), dtype)
    k = jax.random.normal(jax.random.key(1), (t, c), jnp.float32) / t
    for bwd in (False, True):
      ms = {}
      for name, fn in (
        ("fft", lambda u, k: lc_ops.long_conv(u, k, implementation="fft")),
        ("xla_direct_conv", _direct_conv),
      ):
        if name == "xla_direct_conv" and t > direct_max_t:
          ms[name] = None
          continue
        try:
          ms[name] = 1e3 * _timed(fn, u, k, bwd)
        except Exception as e:  # noqa: BLE001 - a failed anchor is reported, not fatal
          ms[name] = None
          print(f"{name} B={b} T={t}: {type(e).__name__}: {str(e)[:200]}", flush=True)
      io_bytes = 2 * b * t * c * jnp.dtype(dtype).itemsize * (2 if bwd else 1)
      row = dict(
        op="long_conv",
        mode="fwdbwd" if bwd else "fwd",
        B=b,
        T=t,
        C=c,
        dtype=jnp.dtype(dtype).name,
        fft_ms=ms["fft"],
        direct_ms=ms["xla_direct_conv"],
        fft_GBps=None if ms["fft"] is None else io_bytes / ms["fft"] / 1e6,
        speedup=None if None in ms.values() else ms["xla_direct_conv"] / ms["fft"],
      )
      print(row, flush=True)
      rows.append(row)
  return rows


def hyena_filter(length: int, channels: int, seed: int = 0) -> jax.Array:
  """A random Hyena implicit filter [L,C] (Zoology's w=1, emb_dim 3; MLP weights
  N(0, 1/fan_in))."""
  from attnzoo.mixers.layers import ImplicitFilter  # bench sits above mixers

  module = ImplicitFilter(channels, length, emb_dim=3, order=64, w=1.0)
  params = module.init(jax.random.key(seed))
  params = jax.tree_util.tree_map_with_path(  # N(0, 0.02) -> N(0, 1 / fan_in)
    lambda path, p: p / (0.02 * math.sqrt(p.shape[0])) if "kernel" in str(path) else p, params
  )
  return module.apply(params)


def generation_rows(
  steps: int = 4096,
  channels: int = 768,
  vocab: int = 256,
  order: int = 16,
  epoch: int | None = None,
) -> list[dict]:
  epoch = epoch or 2 ** round(math.log2(math.sqrt(steps * math.log2(steps))))
  keys = jax.random.split(jax.random.key(0), 3)
  kernel = hyena_filter(steps, channels)
  emb = jax.random.normal(keys[0], (vocab, channels))
  readout = jax.random.normal(keys[1], (channels, vocab)) / math.sqrt(channels)
  tokens_of = lambda y: jnp.argmax(y @ readout, axis=-1)
  next_input = lambda t, y: emb[tokens_of(y)]
  u0 = emb[jax.random.randint(keys[2], (1,), 0, vocab)]
  log_da, w = cd.distill_modal(np.asarray(kernel), order)
  distilled = ssm_ops.kernel(log_da, w, steps)
  filter_error = float(jnp.linalg.norm(distilled - kernel) / jnp.linalg.norm(kernel))
  runs = {
    "naive": jax.jit(lambda u0, k: cd.generate_naive(u0, k, next_input, steps)),
    "futurefill": jax.jit(lambda u0, k: cd.generate_futurefill(u0, k, next_input, steps, epoch)),
    "distilled_ssm": jax.jit(lambda u0, k: cd.generate_ssm(u0, log_da, w, next_input, steps)),
  }
  us, ys = runs["naive"](u0, kernel)
  ref_tokens = tokens_of(ys)
  forced = {  # each method's outputs on the naive inputs (teacher forcing)
    "naive": ys,
    "futurefill": lc_ops.long_conv(us, kernel, implementation="fft"),
    "distilled_ssm": ssm_ops.diag_ssm(us, log_da, w, implementation="recurrent"),
  }
  rows = []
  naive_s = None
  for name, fn in runs.items():
    seconds = median_seconds(fn, u0, kernel, reps=3)
    naive_s = naive_s or seconds
    agreement = float(jnp.mean(tokens_of(forced[name]) == ref_tokens))
    row = dict(
      op="hyena_generation",
      method=name,
      steps=steps,
      C=channels,
      epoch=epoch if name == "futurefill" else None,
      order=order if name == "distilled_ssm" else None,
      ms=1e3 * seconds,
      ms_per_token=1e3 * seconds / steps,
      speedup_vs_naive=naive_s / seconds,
      next_token_agreement=agreement,
      filter_rel_error=filter_error if name == "distilled_ssm" else None,
    )
    print(row, flush=True)
    rows.append(row)
  return rows


def to_markdown(rows: list[dict], device: str) -> str:
  lines = [f"# Long convolutions on {device} (jax {jax.__version__})", ""]
  fft = [r for r in rows if r["op"] == "long_conv"]
  if fft:
    lines += [
      "| mode | B | T | C | dtype | FFT ms | XLA direct conv ms | direct / FFT | FFT GB/s |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x, f="{:.3f}": "n/a" if x is None else f.format(x)
    for r in fft:
      lines.append(
        f"| {r['mode']} | {r['B']} | {r['T']} | {r['C']} | {r['dtype']} | {fmt(r['fft_ms'])} | "
        f"{fmt(r['direct_ms'])} | {fmt(r['speedup'], '{:.1f}x')} | {fmt(r['fft_GBps'], '{:.0f}')} |"
      )
    lines.append("")
  gen = [r for r in rows if r["op"] == "hyena_generation"]
  if gen:
    lines += [
      "| generation | tokens | C | ms | ms/token | vs naive | next-token agreement | notes |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r in gen:
      note = ""
      if r["epoch"]:
        note = f"epoch {r['epoch']}"
      if r["order"]:
        note = f"{r['order']} modes/channel, filter rel. error {r['filter_rel_error']:.2e}"
      lines.append(
        f"| {r['method']} | {r['steps']} | {r['C']} | {r['ms']:.1f} | {r['ms_per_token']:.4f} | "
        f"{r['speedup_vs_naive']:.1f}x | {r['next_token_agreement']:.4f} | {note} |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(prog="attnzoo bench long_conv", description=__doc__)
  p.add_argument("--out-dir", default=os.path.join("experiments", "results", "kernels"))
  p.add_argument("--parts", default="fft,generation")
  p.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
  p.add_argument("--direct-max-t", type=int, default=4096, help="longest T for the direct anchor")
  p.add_argument("--gen-steps", type=int, default=4096, help="tokens generated")
  p.add_argument("--gen-channels", type=int, default=768, help="channels of the generated conv")
  p.add_argument("--gen-order", type=int, default=16, help="modes per channel when distilled")
  args = p.parse_args(argv)
  device = jax.devices()[0].device_kind
  print(f"device: {device}, jax {jax.__version__}", flush=True)
  parts = args.parts.split(",")
  rows = []
  if "fft" in parts:
    rows += fft_rows(((1, 256, 64),) if args.quick else FFT_SHAPES, direct_max_t=args.direct_max_t)
  if "generation" in parts:
    gen = dict(steps=args.gen_steps, channels=args.gen_channels, order=args.gen_order)
    rows += generation_rows(**(dict(gen, steps=256, channels=32) if args.quick else gen))
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, f"long_conv_{device_name()}")
  with open(stem + ".json", "w") as f:
    json.dump(dict(device=device, jax=jax.__version__, rows=rows), f, indent=1)
  md = to_markdown(rows, device)
  with open(stem + ".md", "w") as f:
    f.write(md)
  print(md)
  return 0
