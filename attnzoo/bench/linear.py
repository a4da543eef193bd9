"""`attnzoo bench linear`: the Pallas decayed-linear-attention kernels against the chunked
pure-jnp form ("xla") in the same run, and against fla's Triton kernels (chunk_simple_gla,
chunk_gla, chunk_gated_delta_rule) measured in a separate process (torch and JAX never share
one) when torch and fla are importable.

Cases: bf16, H=16, K=V=D=128, B x T = 4 x 4096 and 1 x 16384, forward and forward+backward,
for each variant: linear (no decay), scalar (per-head decay: RetNet/Lightning/SSD/simple GLA),
vector (per-channel decay: GLA/HGRN-2), rwkv6 (vector decay + bonus), normalized (no decay,
running key-sum normaliser); plus the delta rule (attnzoo.ops.delta_rule) when it exists.
FLOPs = B*H*T*(2cK + 2cV + 4KV), c = 64, x3 for forward+backward (fla's convention).
Peak memory of forward+backward (XLA's compiled buffer assignment: arguments + outputs +
temporaries) at T = 16k and 64k. Writes experiments/results/kernels/linear_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

SHAPES = ((4, 4096, 16, 128), (1, 16384, 16, 128))
VARIANTS = ("linear", "scalar", "vector", "rwkv6", "normalized")
FLA_FOR = {"scalar": "simple_gla", "vector": "gla", "delta_rule": "gated_delta_rule"}
# fla 0.6.0 on one H200 (PyTorch 2.11, Triton 3.6), 2026-11-29 (shared/anchors): used only when
# fla cannot be run in this session; marked "recorded" in the table.
FLA_RECORDED = {
  ("simple_gla", "fwd", 4, 4096): 0.2913,
  ("simple_gla", "fwd", 1, 16384): 0.6788,
  ("gla", "fwd", 4, 4096): 0.7216,
  ("gla", "fwd", 1, 16384): 0.8818,
  ("gla", "fwdbwd", 4, 4096): 2.9980,
  ("gla", "fwdbwd", 1, 16384): 3.56,
  ("gated_delta_rule", "fwd", 4, 4096): 0.5097,
  ("gated_delta_rule", "fwd", 1, 16384): 1.07,
}


def flops(b, t, h, k, v, bwd, chunk=64):
  f = b * h * t * (2 * chunk * k + 2 * chunk * v + 4 * k * v)
  return f * (3 if bwd else 1)


# ----------------------------------------------------------------------------- fla (torch) side


def fla_worker(out_path, shapes):
  """Runs in its own process: times fla's kernels with triton.testing.do_bench."""
  import fla.ops.gated_delta_rule as gdr
  import fla.ops.gla as gla
  import fla.ops.simple_gla as sg
  import torch
  import triton

  rows = []
  dev, dt = "cuda", torch.bfloat16
  for b, t, h, d in shapes:
    for name in ("simple_gla", "gla", "gated_delta_rule"):
      for bwd in (False, True):
        mode = "fwdbwd" if bwd else "fwd"
        row = dict(impl="fla", op=name, mode=mode, shape=[b, t, h, d])
        try:
          torch.manual_seed(0)
          q = (torch.randn(b, t, h, d, device=dev, dtype=dt) * d**-0.5).requires_grad_()
          k = (torch.randn(b, t, h, d, device=dev, dtype=dt) * d**-0.5).requires_grad_()
          v = torch.randn(b, t, h, d, device=dev, dtype=dt).requires_grad_()
          do = torch.randn(b, t, h, d, device=dev, dtype=dt)
          if name == "simple_gla":
            g = -torch.nn.functional.softplus(torch.randn(b, t, h, device=dev)) * 0.1
            g.requires_grad_()
            call, inputs = (lambda: sg.chunk_simple_gla(q, k, v, g=g)[0]), (q, k, v, g)
          elif name == "gla":
            g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, d, device=dev)) / 16
            g.requires_grad_()
            call, inputs = (lambda: gla.chunk_gla(q, k, v, g=g)[0]), (q, k, v, g)
          else:
            kn = torch.nn.functional.normalize(k.detach().float(), dim=-1).to(dt).requires_grad_()
            g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device=dev)).requires_grad_()
            beta = torch.rand(b, t, h, device=dev, dtype=dt).sigmoid().requires_grad_()
            call = lambda: gdr.chunk_gated_delta_rule(q, kn, v, g=g, beta=beta)[0]
            inputs = (q, kn, v, g, beta)
          if bwd:
            fn = lambda: torch.autograd.grad(call(), inputs, do)
          else:

            def fn():
              with torch.no_grad():
                call()

          t0 = time.perf_counter()
          fn()
          torch.cuda.synchronize()
          row["first_call_s"] = time.perf_counter() - t0
          row["ms"] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # fla refuses gated backward on Hopper with Triton 3.4-3.7.0
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out_path, "w") as f:
          json.dump(dict(torch=torch.__version__, triton=triton.__version__, rows=rows), f)


def run_fla(shapes, timeout):
  """fla rows from a child process, or [] with the reason printed."""
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("fla") is None:
    print("fla: torch or fla not importable; using the recorded fla numbers", flush=True)
    return []
  path = os.path.join(tempfile.mkdtemp(), "fla.json")
  cmd = [
    sys.executable,
    "-m",
    "attnzoo.bench.linear",
    "--fla-worker",
    path,
    "--shapes",
    ";".join(",".join(map(str, s)) for s in shapes),
  ]
  try:
    subprocess.run(cmd, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    print(
      f"fla: worker stopped after {timeout} s (autotuning); keeping what it measured", flush=True
    )
  return load_fla(path)


def load_fla(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    data = json.load(f)
  return [
    dict(r, versions=f"torch {data.get('torch')}, triton {data.get('triton')}")
    for r in data["rows"]
  ]


# ----------------------------------------------------------------------------- JAX side


def _inputs(variant, b, t, h, d, seed=0):
  import jax
  import jax.numpy as jnp

  ks = jax.random.split(jax.random.key(seed), 6)
  bf = jnp.bfloat16
  q = (jax.random.normal(ks[0], (b, t, h, d), jnp.float32) * d**-0.5).astype(bf)
  k = (jax.random.normal(ks[1], (b, t, h, d), jnp.float32) * d**-0.5).astype(bf)
  v = jax.random.normal(ks[2], (b, t, h, d), jnp.float32).astype(bf)
  diff, static = {}, dict(scale=d**-0.5)
  if variant == "scalar":
    diff["log_decay"] = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h))) * 0.1
  elif variant in ("vector", "rwkv6"):
    diff["log_decay"] = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, d))) / 16
  if variant == "rwkv6":
    diff["bonus"] = jax.random.normal(ks[4], (h, d)) * 0.1
  if variant == "normalized":
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    static["normalize"] = True
  if variant == "delta_rule":
    k = (
      k.astype(jnp.float32) / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)
    ).astype(bf)
    diff["beta"] = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h))).astype(bf)
    diff["log_decay"] = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)))
  return (q, k, v), diff, static


def _op_fn(variant, impl, static, tuning=None):
  """f(q, k, v, diff) -> o."""
  if variant == "delta_rule":
    from attnzoo.ops.delta_rule import delta_rule

    return lambda q, k, v, d: delta_rule(
      q, k, v, d["beta"], log_decay=d.get("log_decay"), implementation=impl, **static
    )
  if tuning is not None:  # the kernel directly, with an explicit tuning
    from attnzoo.ops.linear_attention import _augment
    from pallas_kernels.linear_attention import linear_attention as kernel

    def f(q, k, v, d):
      va = _augment(v, static.get("normalize", False))
      o, _ = kernel(
        q, k, va, d.get("log_decay"), scale=static["scale"], bonus=d.get("bonus"), tuning=tuning
      )
      return o

    return f
  from attnzoo.ops.linear_attention import linear_attention

  return lambda q, k, v, d: linear_attention(q, k, v, **d, **static, implementation=impl)


def _jitted(variant, impl, static, bwd, tuning=None):
  """The forward, or forward+backward: the gradients w.r.t. q, k, v and the differentiable
  extras for the cotangent do of o, in o's dtype (fla's o.backward(do) in bf16)."""
  import jax

  f = _op_fn(variant, impl, static, tuning)
  if not bwd:
    return jax.jit(f)

  def fwdbwd(q, k, v, d, do):
    _, pullback = jax.vjp(f, q, k, v, d)
    return pullback(do)

  return jax.jit(fwdbwd)


def measure(variant, impl, shape, bwd, tuning=None):
  import jax

  from attnzoo.bench.timing import median_seconds

  b, t, h, d = shape
  (q, k, v), diff, static = _inputs(variant, b, t, h, d)
  row = dict(
    impl=impl if tuning is None else f"pallas[{_tuning_name(tuning)}]",
    op=variant,
    mode="fwdbwd" if bwd else "fwd",
    shape=list(shape),
  )
  try:
    fn = _jitted(variant, impl, static, bwd, tuning)
    args = (q, k, v, diff)
    if bwd:
      args += (jax.random.normal(jax.random.key(9), v.shape).astype(v.dtype),)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    row["first_call_s"] = time.perf_counter() - t0
    s = median_seconds(fn, *args)
    row["ms"] = s * 1e3
    row["tflops"] = flops(b, t, h, d, d, bwd) / s / 1e12
  except Exception as e:
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if "Unsupported" not in type(e).__name__:
      traceback.print_exc(limit=3)
  print(json.dumps(row), flush=True)
  return row


def _tuning_name(c):
  import dataclasses

  default = type(c)()
  return (
    ",".join(
      f"{f.name}={getattr(c, f.name)}"
      for f in dataclasses.fields(c)
      if getattr(c, f.name) != getattr(default, f.name)
    )
    or "default"
  )


def peak_memory(variant, impl, t, b=1, h=16, d=128):
  """Bytes XLA assigns to one forward+backward step (arguments, outputs, temporaries)."""
  import jax

  (q, k, v), diff, static = _inputs(variant, b, t, h, d)
  row = dict(impl=impl, op=variant, mode="fwdbwd", shape=[b, t, h, d], what="peak_memory")
  try:
    fn = _jitted(variant, impl, static, True)
    do = jax.ShapeDtypeStruct(v.shape, v.dtype)
    m = fn.lower(q, k, v, diff, do).compile().memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    row["peak_gib"] = total / 2**30
    row["temp_gib"] = m.temp_size_in_bytes / 2**30
  except Exception as e:
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
  print(json.dumps(row), flush=True)
  return row


def device_name(kind=None):
  """File-name form of a device kind (default: this process's first device)."""
  if kind is None:
    import jax

    kind = jax.devices()[0].device_kind
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


# ----------------------------------------------------------------------------- report


def to_markdown(rows, device, fla_source):
  by = {(r["impl"], r["op"], r["mode"], tuple(r["shape"])): r for r in rows if "what" not in r}
  fla = {}
  for r in rows:
    if r["impl"] == "fla" and "ms" in r:
      fla[(r["op"], r["mode"], r["shape"][0], r["shape"][1])] = (r["ms"], "")
  for key, ms in FLA_RECORDED.items():
    fla.setdefault(key, (ms, " (recorded)"))
  earlier = sorted({f"{r['op']} ({r['impl']})" for r in rows if r.get("earlier_run")})
  lines = [
    f"# Decayed linear attention on {device}",
    "",
    "bf16, H=16, K=V=128; ms (TFLOP/s with FLOPs = B·H·T·(2cK+2cV+4KV), c=64, ×3 for "
    "fwd+bwd). fwd+bwd: the forward and the pullback of a bf16 cotangent of o (fla's "
    "o.backward(do)). `xla` = chunked pure-jnp form (chunk 64), same run unless noted; "
    f"fla: {fla_source}.",
    "",
  ]
  if earlier:
    lines += [
      f"Measured in an earlier run on the same device (code unchanged since, not "
      f"re-measured to save device time): {', '.join(earlier)}.",
      "",
    ]
  lines += [
    "| op | B×T | mode | pallas | xla | xla/pallas | fla | pallas/fla |",
    "|---|---|---|---|---|---|---|---|",
  ]
  ops = [o for o in VARIANTS + ("delta_rule",) if any(r["op"] == o for r in rows)]
  shapes = sorted(
    {tuple(r["shape"]) for r in rows if r["impl"] in ("pallas", "xla") and "what" not in r},
    key=lambda s: (s[1], -s[0]),
  )
  for op in ops:
    for b, t, h, d in shapes:
      for mode in ("fwd", "fwdbwd"):
        p = by.get(("pallas", op, mode, (b, t, h, d)), {})
        x = by.get(("xla", op, mode, (b, t, h, d)), {})
        cell = lambda r: (
          f"{r['ms']:.3f} ({r['tflops']:.0f})" if "ms" in r else ("failed" if "error" in r else "–")
        )
        ratio = f"{x['ms'] / p['ms']:.2f}×" if "ms" in p and "ms" in x else "–"
        fname = FLA_FOR.get(op)
        fcell, fratio = "–", "–"
        if fname is not None:
          err = by.get(("fla", fname, mode, (b, t, h, d)), {}).get("error")
          if (fname, mode, b, t) in fla:
            fms, tag = fla[(fname, mode, b, t)]
            fcell = f"{fname} {fms:.3f}{tag}"
            if "ms" in p:
              fratio = f"{p['ms'] / fms:.2f}"
          elif err:
            fcell = f"{fname}: refused"
        lines.append(
          f"| {op} | {b}×{t} | {mode} | {cell(p)} | {cell(x)} | {ratio} | {fcell} | {fratio} |"
        )
  mem = [r for r in rows if r.get("what") == "peak_memory"]
  if mem:
    lines += [
      "",
      "Peak memory of one forward+backward step (B=1, H=16, D=128, bf16; XLA "
      "buffer assignment: arguments + outputs + temporaries):",
      "",
      "| op | impl | T | peak GiB | temporaries GiB |",
      "|---|---|---|---|---|",
    ]
    for r in mem:
      impl = r["impl"] + (f" ({r['revision'].split(' (')[0]})" if "revision" in r else "")
      if "peak_gib" in r:
        lines.append(
          f"| {r['op']} | {impl} | {r['shape'][1]} | {r['peak_gib']:.2f} | {r['temp_gib']:.2f} |"
        )
      else:
        lines.append(f"| {r['op']} | {r['impl']} | {r['shape'][1]} | failed | |")
  errors = [r for r in rows if "error" in r]
  if errors:
    lines += ["", "Failures and refusals:", ""]
    for r in errors:
      lines.append(f"- {r['impl']} {r['op']} {r['mode']} {r['shape']}: {r['error']}")
  sweep = [r for r in rows if r["impl"].startswith("pallas[") and "ms" in r]
  if sweep:
    lines += [
      "",
      "Block-configuration sweep (pallas kernel called directly):",
      "",
      "| config | op | B×T | mode | ms |",
      "|---|---|---|---|---|",
    ]
    for r in sweep:
      lines.append(
        f"| {r['impl']} | {r['op']} | {r['shape'][0]}×{r['shape'][1]} | "
        f"{r['mode']} | {r['ms']:.3f} |"
      )
  return "\n".join(lines) + "\n"


def merge(paths, out_dir):
  """Writes one table (md + json) from the JSON files of runs on the same kind of device."""
  runs = []
  for path in paths:
    with open(path) as f:
      runs.append(json.load(f))
  device = runs[0]["device"]
  if any(r["device"] != device for r in runs):
    raise SystemExit(f"merge: runs from different devices: {sorted({r['device'] for r in runs})}")
  fla = [r["fla"] for r in runs if r["fla"].startswith("fla 0.6.0 measured")]
  fla_source = fla[0] if fla else runs[0]["fla"]
  rows = [row for r in runs for row in r["rows"]]
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"linear_{device_name(device)}")
  with open(stem + ".json", "w") as f:
    json.dump(dict(device=device, jax=runs[0]["jax"], fla=fla_source, rows=rows), f, indent=1)
  md = to_markdown(rows, device, fla_source)
  with open(stem + ".md", "w") as f:
    f.write(md)
  print(md, flush=True)
  return 0


def main(argv=None):
  p = argparse.ArgumentParser(prog="attnzoo bench linear", description=__doc__)
  p.add_argument("--out-dir", default=os.path.join("experiments", "results", "kernels"))
  p.add_argument("--variants", default=",".join(VARIANTS + ("delta_rule",)))
  p.add_argument("--impls", default="pallas,xla")
  p.add_argument("--modes", default="fwd,fwdbwd")
  p.add_argument(
    "--fla",
    default="auto",
    help="auto (child process if torch+fla import), off, or a worker's JSON file",
  )
  p.add_argument("--fla-timeout", type=float, default=600)
  p.add_argument("--memory", default="16384,65536", help="T values for the peak-memory table")
  p.add_argument(
    "--sweep",
    default="",
    help="kernel tunings to time too: 'variant+variant:field=value,...;...' with "
    "the fields of pallas_kernels.linear_attention.Tuning",
  )
  p.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
  p.add_argument("--fla-worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--shapes", default=None, help="'B,T,H,D;...' (default: the two bench shapes)")
  p.add_argument(
    "--merge",
    default=None,
    help="'a.json,b.json,...': no measuring; one table from runs made in parallel "
    "(one GPU each), written to --out-dir",
  )
  args = p.parse_args(argv)
  if args.merge:
    return merge(args.merge.split(","), args.out_dir)
  shapes = SHAPES
  if args.shapes:
    shapes = tuple(tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";"))
  elif args.quick:
    shapes = ((1, 256, 2, 64),)
  if args.fla_worker:
    fla_worker(args.fla_worker, shapes)
    return 0
  # fla first, in its own process, before this process initialises a JAX backend
  fla_rows, fla_source = [], "recorded fla 0.6.0 numbers (H200, Triton 3.6, 2026-11-29)"
  if args.fla == "auto":
    fla_rows = run_fla(shapes, args.fla_timeout)
  elif args.fla != "off":
    fla_rows = load_fla(args.fla)
  if fla_rows:
    fla_source = f"fla 0.6.0 measured in this run in a separate process ({fla_rows[0]['versions']})"
  import jax

  device = jax.devices()[0].device_kind
  print(f"device: {device}, jax {jax.__version__}", flush=True)
  variants = [v for v in args.variants.split(",") if v]
  if "delta_rule" in variants and importlib.util.find_spec("attnzoo.ops.delta_rule") is None:
    variants.remove("delta_rule")
  rows = list(fla_rows)
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, f"linear_{device_name()}")

  def save():  # after every row, so a run cut short keeps what it measured
    with open(stem + ".json", "w") as f:
      json.dump(dict(device=device, jax=jax.__version__, fla=fla_source, rows=rows), f, indent=1)
    md = to_markdown(rows, device, fla_source)
    with open(stem + ".md", "w") as f:
      f.write(md)
    return md

  # the other ops first; the delta rule (another op, possibly slow) after them
  for group in (
    [v for v in variants if v != "delta_rule"],
    [v for v in variants if v == "delta_rule"],
  ):
    for shape in shapes:
      for variant in group:
        for mode in args.modes.split(","):
          for impl in args.impls.split(","):
            rows.append(measure(variant, impl, shape, mode == "fwdbwd"))
            save()
  if args.sweep:
    from pallas_kernels.linear_attention import Tuning

    for spec in args.sweep.split(";"):
      names, fields = spec.split(":")
      tuning = Tuning(**{f.split("=")[0]: int(f.split("=")[1]) for f in fields.split(",") if f})
      for shape in shapes:
        for variant in names.split("+"):
          for mode in args.modes.split(","):
            rows.append(measure(variant, "pallas", shape, mode == "fwdbwd", tuning=tuning))
            save()
  for t in (int(x) for x in args.memory.split(",") if x):
    for impl in args.impls.split(","):
      rows.append(peak_memory("scalar", impl, t))
      save()
  md = save()
  print(md, flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
