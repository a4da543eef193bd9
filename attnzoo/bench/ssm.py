"""`attnzoo bench ssm`: state-space and long-convolution kernels, one table per section.

Section "selective_scan" (Mamba): the Pallas selective scan (pallas_kernels.selective_scan)
against lax.associative_scan (`reference`, materialises [B,T,D,N]), the lax.scan recurrence
(`recurrent`) and the chunked pure-jnp form ("xla"), all in the same run: batch 4,
T = 4096 and 16384, d_inner 2048, state 16, bf16 x / delta / B / C (A, D and the delta bias
float32; softplus on), forward and forward+backward (gradients of every input), and the peak
memory of forward+backward (XLA's compiled buffer assignment: arguments + outputs +
temporaries). The scan is memory-bound: GB/s counts the bytes that must move at the least
(forward: read x, delta, B, C, write y; backward: read x, delta, B, C, dy, write dx, ddelta,
dB, dC), not what an implementation actually moves.
Work per step and state element (b, t, d, n): one exp and ~5 float32 FLOPs forward (decay,
decay * h + u, u = dt x B, C . h); the kernels' backward recomputes the chunk (one exp) and
the decay (one exp) and does ~12 FLOPs. At B=4, T=16384, D=2048, N=16 that is 2.1e9 exps
forward against 0.40 GB of minimum traffic: on an H200 (~4.2e12 exp/s from the SFUs of 132
SMs at 1.98 GHz, ~4.3 TB/s) the exps (~0.5 ms) weigh more than the bytes (~0.1 ms).

More sections (FFT long convolution, Hyena decoding from attnzoo/bench/long_conv.py) plug in
as a function returning rows with their "section" name plus a renderer in RENDERERS.
Writes experiments/results/kernels/ssm_<device>.{md,json} after every row.
"""

from __future__ import annotations

import argparse
import json
import os

from attnzoo.bench.linear import device_name
from attnzoo.bench.timing import median_seconds

SCAN_SHAPES = ((4, 4096, 2048, 16), (4, 16384, 2048, 16))
QUICK_SHAPES = ((1, 40, 32, 16),)
SCAN_IMPLS = ("pallas", "associative", "scan", "xla")
ANCHOR = "associative"


def scan_bytes(b, t, d, n, bwd):
  fwd = b * t * (3 * d + 2 * n) * 2
  return fwd + (b * t * (5 * d + 4 * n) * 2 if bwd else 0)


def _scan_inputs(b, t, d, n, seed=0):
  import jax
  import jax.numpy as jnp

  ks = jax.random.split(jax.random.key(seed), 7)
  bf = jnp.bfloat16
  normal = lambda i, shape: jax.random.normal(ks[i], shape, jnp.float32)
  return dict(
    x=normal(0, (b, t, d)).astype(bf),
    delta=(normal(1, (b, t, d)) - 2.0).astype(bf),
    A=-jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n)),
    B=normal(2, (b, t, n)).astype(bf),
    C=normal(3, (b, t, n)).astype(bf),
    D=jnp.ones((d,), jnp.float32),
    delta_bias=normal(4, (d,)) * 0.5 - 3.0,
  )


def _scan_fn(impl, tuning=None):
  """f(**inputs) -> y through the op, or the kernel package with a tuning."""
  if impl in ("pallas", "interpret") and tuning is not None:
    from pallas_kernels.selective_scan import selective_scan

    return lambda **kw: selective_scan(**kw, tuning=tuning, interpret=impl == "interpret")[0]
  from attnzoo.ops.selective_scan import selective_scan

  return lambda **kw: selective_scan(**kw, implementation=impl)


def _jitted(impl, bwd, tuning=None):
  import jax
  import jax.numpy as jnp

  f = _scan_fn(impl, tuning)
  if not bwd:
    return jax.jit(lambda inputs: f(**inputs))

  def loss(inputs, dy):
    return jnp.sum(f(**inputs).astype(jnp.float32) * dy.astype(jnp.float32))

  return jax.jit(jax.grad(loss))


def _row(impl, shape, mode, tuning, **extra):
  row = dict(section="selective_scan", impl=impl, mode=mode, shape=list(shape), **extra)
  if tuning is not None:
    row["tuning"] = str(tuning)
  return row


def _error(e):
  return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def measure_scan(impl, shape, bwd, tuning=None):
  import jax

  mode = "fwdbwd" if bwd else "fwd"
  row = _row(impl, shape, mode, tuning)
  try:
    inputs = _scan_inputs(*shape)
    fn = _jitted(impl, bwd, tuning)
    args = (inputs, inputs["x"]) if bwd else (inputs,)
    seconds = median_seconds(fn, *args)
    row["ms"] = seconds * 1e3
    row["gbps"] = scan_bytes(*shape, bwd) / seconds / 1e9
    del inputs
    jax.clear_caches()
  except Exception as e:
    row["error"] = _error(e)
  print(json.dumps(row), flush=True)
  return row


def scan_peak_memory(impl, shape, tuning=None):
  """Bytes XLA assigns to one forward+backward (arguments, outputs, temporaries)."""
  import jax

  row = _row(impl, shape, "fwdbwd", tuning, what="peak_memory")
  try:
    spec = jax.eval_shape(lambda: _scan_inputs(*shape))
    m = _jitted(impl, True, tuning).lower(spec, spec["x"]).compile().memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    row["peak_gib"] = total / 2**30
    row["temp_gib"] = m.temp_size_in_bytes / 2**30
  except Exception as e:
    row["error"] = _error(e)
  print(json.dumps(row), flush=True)
  return row


def parse_tunings(spec):
  """'chunk=16,block_d=32,forward=2x2;...' -> [Tuning, ...] (pallas_kernels.selective_scan)."""
  from pallas_kernels.selective_scan import Tuning

  tunings = []
  for part in (p for p in spec.split(";") if p):
    fields = {}
    for item in part.split(","):
      key, value = item.split("=")
      fields[key] = tuple(int(v) for v in value.split("x")) if "x" in value else int(value)
    tunings.append(Tuning(**fields))
  return tunings


# ----------------------------------------------------------------------------- report


def _scan_table(rows):
  timed = [r for r in rows if r.get("section") == "selective_scan" and "what" not in r]
  anchor = {
    (r["mode"], tuple(r["shape"])): r["ms"] for r in timed if r["impl"] == ANCHOR and "ms" in r
  }
  lines = [
    "## Selective scan (Mamba)",
    "",
    f"bf16 x, delta, B, C; float32 state. speedup = {ANCHOR} ms / ms, same run.",
    "",
    "| B | T | D | N | mode | impl | ms | GB/s (min. bytes) | speedup vs associative |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in timed:
    b, t, d, n = r["shape"]
    impl = r["impl"] + (f" {r['tuning']}" if "tuning" in r else "")
    head = f"| {b} | {t} | {d} | {n} | {r['mode']} | {impl} |"
    if "ms" not in r:
      lines.append(f"{head} error: {r['error'][:120]} | | |")
      continue
    ref = anchor.get((r["mode"], tuple(r["shape"])))
    ratio = f"{ref / r['ms']:.2f}x" if ref else "-"
    lines.append(f"{head} {r['ms']:.3f} | {r['gbps']:.0f} | {ratio} |")
  mem = [r for r in rows if r.get("section") == "selective_scan" and r.get("what") == "peak_memory"]
  if mem:
    lines += [
      "",
      "Peak memory of forward+backward (compiled buffer assignment):",
      "",
      "| T | impl | peak GiB | temporaries GiB |",
      "|---|---|---|---|",
    ]
    for r in mem:
      if "peak_gib" in r:
        lines.append(
          f"| {r['shape'][1]} | {r['impl']} | {r['peak_gib']:.4g} | {r['temp_gib']:.4g} |"
        )
      else:
        lines.append(f"| {r['shape'][1]} | {r['impl']} | error: {r['error'][:120]} | |")
  return lines


# section name -> rows -> markdown lines (the long-convolution sections add theirs here)
RENDERERS = {"selective_scan": _scan_table}


def to_markdown(rows, device, jax_version):
  lines = [f"# State-space kernels on {device} (jax {jax_version})", ""]
  for render in RENDERERS.values():
    lines += render(rows) + [""]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="attnzoo bench ssm", description=__doc__)
  p.add_argument("--out-dir", default=os.path.join("experiments", "results", "kernels"))
  p.add_argument("--impls", default=",".join(SCAN_IMPLS), help="pallas,associative,scan,xla")
  p.add_argument("--modes", default="fwd,fwdbwd")
  p.add_argument("--memory", default="4096,16384", help="T values for the peak-memory table")
  p.add_argument(
    "--tunings",
    default="",
    help="Pallas tunings to time too: 'chunk=16,block_d=32,forward=2x2,backward=4x2;...'",
  )
  p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke check)")
  p.add_argument("--shapes", default=None, help="'B,T,D,N;...' (default: the two bench shapes)")
  args = p.parse_args(argv)
  import jax

  shapes = QUICK_SHAPES if args.quick else SCAN_SHAPES
  if args.shapes:
    shapes = tuple(tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";"))
  impls = [i for i in args.impls.split(",") if i]
  if jax.default_backend() == "cpu":  # the kernels run in interpret mode off GPU/TPU
    impls = ["interpret" if i == "pallas" else i for i in impls]
  device = jax.devices()[0].device_kind
  print(f"device: {device}, jax {jax.__version__}", flush=True)
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, f"ssm_{device_name()}")
  rows = []

  def save():  # after every row, so that a run cut short keeps what it measured
    with open(stem + ".json", "w") as f:
      json.dump(dict(device=device, jax=jax.__version__, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
      f.write(to_markdown(rows, device, jax.__version__))

  tunings = parse_tunings(args.tunings)
  kernel = "interpret" if "interpret" in impls else "pallas"
  for shape in shapes:
    for mode in args.modes.split(","):
      for impl in impls:
        rows.append(measure_scan(impl, shape, mode == "fwdbwd"))
        save()
      for tuning in tunings:
        rows.append(measure_scan(kernel, shape, mode == "fwdbwd", tuning))
        save()
  memory_ts = [int(x) for x in args.memory.split(",") if x]
  for shape in shapes:
    if args.quick or shape[1] in memory_ts:
      for impl in impls:
        rows.append(scan_peak_memory(impl, shape))
        save()
  print(f"wrote {stem}.md and {stem}.json", flush=True)
  print(to_markdown(rows, device, jax.__version__), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
