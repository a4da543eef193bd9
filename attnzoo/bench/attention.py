"""`attnzoo bench attention`: the Pallas flash-attention kernel against cuDNN, XLA and JAX's
Pallas `mha`, measured in the same run on the current device.

Cases (bf16, H=16, D=128): B x T = 4 x 4096 and 1 x 16384, causal and non-causal, forward and
forward+backward; plus at T=16384 a causal sliding window of 1024 and causal packed documents
(segment ids). FLOPs = 4*B*H*T^2*D (halved for causal; for windows and packed documents the
exact number of visible (q, k) pairs replaces T^2/2), x3.5 for forward+backward.
Writes experiments/results/kernels/attention_<device>.{md,json}.

--hopper picks the kernel's forward: auto (the Hopper Mosaic GPU forward on sm90 where it
serves the case, else Triton), on, off (Triton), or both: "pallas" rows use the Triton forward
and "hopper" rows the Hopper forward (same Triton backward), side by side.

--sweep instead times the kernel's forward over tile / launch candidates (SWEEP_FWD) on
causal and full 4x4096 and 1x16384 and the 1024-window at 16384 (cuDNN alongside), compiled
in parallel threads, and writes the table and the best defaults it implies to
attention_<device>_sweep.{md,json}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.bench.timing import median_seconds as _time
from attnzoo.ops.softmax_attention import softmax_attention

IMPLS = ("pallas", "cudnn", "xla", "mha")
HOPPER_MODES = {"auto": None, "on": True, "off": False, "both": False}


def _packed_segments(batch, t, docs, seed=0):
  """Sorted segment ids: `docs` documents of random lengths per row."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.choice(np.arange(1, t), docs - 1, replace=False))
  seg = np.zeros(t, np.int32)
  seg[cuts] = 1
  return jnp.asarray(np.broadcast_to(np.cumsum(seg), (batch, t)).astype(np.int32))


def _visible_pairs(t, *, causal, window=None, segments=None):
  """Per-(batch, head) number of unmasked (q, k) pairs (the FA convention for plain causal)."""
  if window is None and segments is None:
    return t * t / 2 if causal else t * t
  i = np.arange(t)
  if segments is not None:
    seg = np.asarray(segments[0])
    starts = np.searchsorted(seg, seg, side="left")
    lo = starts
  else:
    lo = np.zeros(t, np.int64)
  hi = i if causal else np.full(t, t - 1)
  if window is not None:
    lo = np.maximum(lo, i - window[0])
    hi = np.minimum(hi, i + window[1])
  return float(np.maximum(hi - lo + 1, 0).sum())


def _impl_fn(impl, *, scale, causal, window, segments, tuning=None, hopper=None):
  """(q, k, v) -> o for one implementation, or raises when it cannot serve the case.
  `hopper`: the pallas kernel's forward (see flash_attention); impl "hopper" forces it on."""
  if impl == "hopper":
    impl, hopper = "pallas", True
  if impl == "pallas":
    if tuning is not None or hopper is not None:
      from pallas_kernels.flash_attention import flash_attention

      return lambda q, k, v: flash_attention(
        q,
        k,
        v,
        scale=scale,
        causal=causal,
        window=window,
        segment_ids=segments,
        tuning=tuning,
        hopper=hopper,
      )
    return lambda q, k, v: softmax_attention(
      q,
      k,
      v,
      scale=scale,
      causal=causal,
      window=window,
      segment_ids=segments,
      implementation="pallas",
    )
  if impl in ("cudnn", "xla"):
    if segments is not None and impl == "cudnn":
      raise NotImplementedError("jax.nn's cuDNN path has no segment ids")

    def f(q, k, v):
      mask = None
      if segments is not None:  # built inside the jit: no T x T constant
        mask = segments[:, None, :, None] == segments[:, None, None, :]
      return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=causal,
        mask=mask,
        local_window_size=window,
        implementation=impl if impl == "cudnn" else None,
      )

    return f
  if impl == "mha":
    if window is not None:
      raise NotImplementedError("Pallas mha has no sliding window")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      from jax.experimental.pallas.ops.gpu import attention as pallas_mha
    return lambda q, k, v: pallas_mha.mha(
      q, k, v, segment_ids=segments, sm_scale=scale, causal=causal
    )
  raise ValueError(impl)


def _measure(impl, q, k, v, do, *, causal, window, segments, mode, tuning=None, hopper=None):
  scale = 1.0 / math.sqrt(q.shape[-1])
  f = _impl_fn(
    impl, scale=scale, causal=causal, window=window, segments=segments, tuning=tuning, hopper=hopper
  )
  if mode == "fwd":
    g = jax.jit(f)
    return _time(g, q, k, v), g(q, k, v)

  def loss(q, k, v, do):
    return jnp.sum(f(q, k, v).astype(jnp.float32) * do)

  g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return _time(g, q, k, v, do), None


def _rel(a, b):
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _cases(quick):
  shapes = [(1, 16384), (4, 4096)] if not quick else [(1, 2048)]
  out = []
  for b, t in shapes:
    for causal in (True, False):
      out.append(
        dict(
          name=f"{'causal' if causal else 'full'}", B=b, T=t, causal=causal, window=None, docs=None
        )
      )
    if t >= 2048 and b == 1:
      out.append(dict(name="window1024", B=1, T=t, causal=True, window=(1024, 0), docs=None))
      out.append(dict(name="packed16docs", B=1, T=t, causal=True, window=None, docs=16))
  return out


def device_name():
  kind = jax.devices()[0].device_kind
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def run(args, rows, save):
  heads, dim = 16, 128
  for case in _cases(args.quick):
    b, t = case["B"], case["T"]
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (
      jax.random.normal(kk, (b, t, heads, dim), jnp.float32).astype(jnp.bfloat16) for kk in ks
    )
    do = do.astype(jnp.float32)
    segments = _packed_segments(b, t, case["docs"]) if case["docs"] else None
    pairs = _visible_pairs(t, causal=case["causal"], window=case["window"], segments=segments)
    for mode in ("fwd", "fwdbwd"):
      flops = 4 * b * heads * pairs * dim * (3.5 if mode == "fwdbwd" else 1)
      outs = {}
      for impl in args.impls:
        row = dict(
          case=case["name"],
          B=b,
          T=t,
          H=heads,
          D=dim,
          dtype="bfloat16",
          mode=mode,
          impl=impl,
          causal=case["causal"],
          window=case["window"],
          docs=case["docs"],
        )
        try:
          s, o = _measure(
            impl,
            q,
            k,
            v,
            do,
            causal=case["causal"],
            window=case["window"],
            segments=segments,
            mode=mode,
            tuning=args.tuning if impl == "pallas" else None,
            hopper=HOPPER_MODES[args.hopper] if impl == "pallas" else None,
          )
          row.update(ms=s * 1e3, tflops=flops / s / 1e12)
          if o is not None:
            outs[impl] = o
        except Exception as e:  # one failing implementation must not hide the others
          row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
          if args.verbose:
            traceback.print_exc(limit=3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
      base = outs.get("xla", outs.get("cudnn"))
      if base is not None:
        for r in rows[-len(args.impls) :]:
          if r["impl"] in ("pallas", "hopper") and r["impl"] in outs:
            r["relerr_vs_" + ("xla" if "xla" in outs else "cudnn")] = _rel(outs[r["impl"]], base)
  return rows


FWD_CANDIDATES = [
  dict(block_q=128, block_k=128, num_warps=8, num_stages=2),
  dict(block_q=128, block_k=128, num_warps=8, num_stages=3),
  dict(block_q=128, block_k=64, num_warps=4, num_stages=3),
]
BWD_CANDIDATES = [
  dict(
    block_q_dq=128,
    block_k_dq=64,
    num_warps_dq=8,
    num_stages_dq=2,
    block_q_dkv=64,
    block_k_dkv=128,
    num_warps_dkv=8,
    num_stages_dkv=2,
  ),
  dict(
    block_q_dq=64,
    block_k_dq=64,
    num_warps_dq=4,
    num_stages_dq=2,
    block_q_dkv=64,
    block_k_dkv=64,
    num_warps_dkv=4,
    num_stages_dkv=2,
  ),
  dict(
    block_q_dq=128,
    block_k_dq=32,
    num_warps_dq=4,
    num_stages_dq=3,
    block_q_dkv=32,
    block_k_dkv=128,
    num_warps_dkv=4,
    num_stages_dkv=3,
  ),
]


def tune(args, rows, save):
  """Times the kernel's block-size candidates on the causal case; returns the best Tuning.

  Forward candidates first, then backward candidates (forward+backward time) on top of the
  best forward. Every measurement is kept in the results (rows with "sweep": true).
  """
  from pallas_kernels.flash_attention import Tuning

  heads, dim = 16, 128
  b, t = (4, 4096) if not args.quick else (1, 2048)
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (
    jax.random.normal(kk, (b, t, heads, dim), jnp.float32).astype(jnp.bfloat16) for kk in ks
  )
  do = do.astype(jnp.float32)
  best = {}
  for mode, candidates in (("fwd", FWD_CANDIDATES), ("fwdbwd", BWD_CANDIDATES)):
    flops = 4 * b * heads * t * t / 2 * dim * (3.5 if mode == "fwdbwd" else 1)
    timed = []
    for c in candidates:
      blocks = {**best, **c}
      row = dict(sweep=True, B=b, T=t, mode=mode, causal=True, blocks=blocks)
      try:
        sec, _ = _measure(
          "pallas",
          q,
          k,
          v,
          do,
          causal=True,
          window=None,
          segments=None,
          mode=mode,
          tuning=Tuning(**blocks),
        )
        row.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
        timed.append((sec, c))
      except Exception as e:
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
      rows.append(row)
      print(json.dumps(row), flush=True)
      save()
    if timed:
      best.update(min(timed, key=lambda x: x[0])[1])
  print("tuned block sizes:", json.dumps(best), flush=True)
  return Tuning(**best)


# Forward candidates for --sweep: Tuning fields (the backward keeps its defaults).
SWEEP_FWD = [
  dict(block_q=128, block_k=128, num_warps=8, num_stages=3),  # default
  dict(block_q=128, block_k=128, num_warps=8, num_stages=2),
  dict(block_q=128, block_k=64, num_warps=8, num_stages=3),
  dict(block_q=128, block_k=64, num_warps=8, num_stages=4),
  dict(block_q=128, block_k=64, num_warps=4, num_stages=3),
  dict(block_q=128, block_k=64, num_warps=4, num_stages=2),
  dict(block_q=128, block_k=32, num_warps=4, num_stages=3),
  dict(block_q=64, block_k=64, num_warps=4, num_stages=3),  # default for local windows
  dict(block_q=64, block_k=64, num_warps=4, num_stages=2),
  dict(block_q=64, block_k=128, num_warps=4, num_stages=2),
  dict(block_q=128, block_k=128, num_warps=8, num_stages=3, head_group=1),
  dict(block_q=128, block_k=128, num_warps=8, num_stages=3, head_group=16),
]
SWEEP_CASES = [  # (name, B, T, causal, window)
  ("causal", 4, 4096, True, None),
  ("causal", 1, 16384, True, None),
  ("full", 4, 4096, False, None),
  ("full", 1, 16384, False, None),
  ("window1024", 1, 16384, True, (1024, 0)),
]
QUICK_SWEEP_CASES = [("causal", 1, 2048, True, None), ("window256", 1, 2048, True, (256, 0))]


def _compile_parallel(jobs, budget_s):
  """{key: (fn, args)} -> {key: compiled executable or the exception}.

  Traces and lowers one job at a time, then compiles in threads (the Triton and ptxas
  compiles inside XLA are the slow part and release the GIL). Jobs not started within
  budget_s seconds are skipped (TimeoutError), in the order given.
  """
  start = time.perf_counter()
  lowered = {}
  for key, (fn, fn_args) in jobs.items():
    try:
      lowered[key] = jax.jit(fn).lower(*fn_args)
    except Exception as e:
      lowered[key] = e

  def compile_one(key):
    low = lowered[key]
    if time.perf_counter() - start > budget_s:
      low = TimeoutError(f"skipped: --sweep-budget {budget_s:.0f} s used up")
    if isinstance(low, Exception):
      return key, low
    try:
      return key, low.compile()
    except Exception as e:
      return key, e

  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
    return dict(pool.map(compile_one, lowered))


def sweep(args, rows, save):
  """Times every SWEEP_FWD candidate (and cuDNN, when in --impls) on the SWEEP_CASES forward.

  Rows carry sweep="tiles" and the candidate's Tuning fields ("blocks") or ref="cudnn".
  """
  from pallas_kernels.flash_attention import Tuning

  heads, dim = 16, 128
  scale = 1.0 / math.sqrt(dim)
  cases = QUICK_SWEEP_CASES if args.quick else SWEEP_CASES
  inputs = {}
  for _, b, t, _, _ in cases:
    ks = jax.random.split(jax.random.key(0), 3)
    inputs[b, t] = [
      jax.random.normal(kk, (b, t, heads, dim), jnp.float32).astype(jnp.bfloat16) for kk in ks
    ]
  impls = [("cudnn", "cudnn", None)] if "cudnn" in args.impls else []
  impls += [(j, "pallas", Tuning(**c)) for j, c in enumerate(SWEEP_FWD)]
  jobs = {}  # candidate-major: a sweep cut short by the budget still has whole rows
  for j, impl, tuning in impls:
    for ci, (_, b, t, causal, window) in enumerate(cases):
      fn = _impl_fn(impl, scale=scale, causal=causal, window=window, segments=None, tuning=tuning)
      jobs[ci, j] = (fn, inputs[b, t])
  start = time.perf_counter()
  compiled = _compile_parallel(jobs, args.sweep_budget)
  print(f"sweep: {len(jobs)} compiles in {time.perf_counter() - start:.0f} s", flush=True)
  for (ci, j), exe in compiled.items():
    name, b, t, causal, window = cases[ci]
    pairs = _visible_pairs(t, causal=causal, window=window)
    row = dict(sweep="tiles", case=name, B=b, T=t, mode="fwd")
    if j == "cudnn":
      row["ref"] = "cudnn"
    else:
      row["blocks"] = SWEEP_FWD[j]
    try:
      if isinstance(exe, Exception):
        raise exe
      sec = _time(exe, *inputs[b, t])
      row.update(ms=sec * 1e3, tflops=4 * b * heads * pairs * dim / sec / 1e12)
    except Exception as e:
      row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
    rows.append(row)
    print(json.dumps(row), flush=True)
  save()


def _fwd_tiles(b):
  """The forward fields of a Tuning, as in SWEEP_FWD."""
  return dict(block_q=b.block_q, block_k=b.block_k, num_warps=b.num_warps, num_stages=b.num_stages)


def _blocks_label(c):
  label = f"{c['block_q']}x{c['block_k']} w{c['num_warps']} s{c['num_stages']}"
  return label + (f" g{c['head_group']}" if "head_group" in c else "")


def sweep_markdown(rows, device):
  """The --sweep table (TFLOP/s per candidate and case) and the best defaults it implies."""
  sw = [r for r in rows if r.get("sweep") == "tiles"]
  key = lambda r: json.dumps(r["blocks"]) if "blocks" in r else "cudnn"
  cases = list(dict.fromkeys((r["case"], r["B"], r["T"]) for r in sw))
  cands = list(dict.fromkeys(key(r) for r in sw if "blocks" in r))
  timed = {((r["case"], r["B"], r["T"]), key(r)): r for r in sw if "ms" in r}
  ms = {k: r["ms"] for k, r in timed.items()}

  def cell(case, k):
    if (case, k) not in timed:
      return "—"
    ref = ms.get((case, "cudnn"))
    ratio = f" ({ref / ms[case, k]:.2f}x)" if ref and k != "cudnn" else ""
    return f"{timed[case, k]['tflops']:.0f}{ratio}"

  label = lambda k: "cuDNN" if k == "cudnn" else _blocks_label(json.loads(k))
  lines = [
    f"# Flash-attention forward tile sweep on {device}",
    "",
    f"jax {jax.__version__}; bf16, H=16, D=128; `attnzoo bench attention --sweep`. "
    "TFLOP/s as in attention_<device>.md, (in brackets: vs cuDNN). Candidates: "
    "block_q x block_k, warps, stages, and head_group where not the default.",
    "",
    "| candidate | " + " | ".join(f"{c} {b}x{t}" for c, b, t in cases) + " |",
    "|---" * (len(cases) + 1) + "|",
  ]
  lines += [
    f"| {label(k)} | " + " | ".join(cell(c, k) for c in cases) + " |" for k in cands + ["cudnn"]
  ]
  lines.append("")
  best = {}
  for case in cases:
    options = [k for k in cands if (case, k) in ms]
    if options:
      best[case] = min(options, key=lambda k: ms[case, k])
      lines.append(
        f"- fastest on {case[0]} {case[1]}x{case[2]}: {label(best[case])} "
        f"({ms[case, best[case]]:.3f} ms)"
      )
  # Suggested default: the candidate whose worst causal/full case (time over that case's best
  # time) is best. The window ratio compares the 16k causal time with it against the fastest
  # window candidate.
  from pallas_kernels.flash_attention import default_tuning

  now, now_local = (
    json.dumps(_fwd_tiles(default_tuning(128, 2, local=local))) for local in (False, True)
  )
  dense = [c for c in cases if not c[0].startswith("window") and c in best]
  complete = [k for k in cands if all((c, k) in ms for c in dense)]
  windows = [c for c in cases if c[0].startswith("window") and c in best]

  def window_line(what, w, k_window, k_causal):
    causal = ("causal", w[1], w[2])
    if (causal, k_causal) in ms and (w, k_window) in ms:
      lines.append(
        f"- {what}: {w[0]} {w[1]}x{w[2]} with {label(k_window)} vs causal with "
        f"{label(k_causal)}: {ms[causal, k_causal] / ms[w, k_window]:.2f}x faster"
      )

  for w in windows:
    window_line("current defaults", w, now_local, now)
  if dense and complete:
    default = min(complete, key=lambda k: max(ms[c, k] / ms[c, best[c]] for c in dense))
    lines.append(f"- suggested default (best worst case over causal/full): {label(default)}")
    for w in windows:
      window_line("suggested", w, best[w], default)
  lines += [
    f"- failed: {label(key(r))} on {r['case']} {r['B']}x{r['T']}: {r['error']}"
    for r in sw
    if "error" in r
  ]
  return "\n".join(lines) + "\n"


def to_markdown(rows, device):
  lines = [
    f"# Softmax attention kernels on {device}",
    "",
    f"jax {jax.__version__}; bf16, H=16, D=128; median of timed batches after warm-up. "
    "TFLOP/s = 4*B*H*pairs*D (pairs = T^2/2 causal, T^2 full, exact visible pairs for "
    "window / packed documents) x3.5 for fwd+bwd. Ratios: ours / anchor time inverse "
    "(>1 means ours is faster).",
    "",
    "| case | B x T | mode | ours ms | ours TFLOP/s | cuDNN TFLOP/s | XLA TFLOP/s | "
    "Pallas mha TFLOP/s | vs cuDNN | vs XLA | vs mha |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  main = [r for r in rows if "impl" in r]
  hop = any(r["impl"] == "hopper" for r in main)
  if hop:  # --hopper both: "ours" is the Triton forward; the Hopper forward gets columns
    lines[-2] += " with Hopper fwd: ms | TFLOP/s | vs cuDNN | vs mha |"
    lines[-1] += "---|---|---|---|"
  tuned = [r["tuned"] for r in rows if "tuned" in r]
  earlier = sorted({r["impl"] for r in rows if r.get("earlier_run")})
  if earlier:
    lines[3:3] = [
      f"Columns measured in an earlier run on the same device (same code paths, "
      f"not re-measured to save device time): {', '.join(earlier)}.",
      "",
    ]
  if tuned:
    lines[3:3] = [f"Kernel block sizes (chosen by --tune in this run): `{tuned[0]}`", ""]
  else:
    from pallas_kernels.flash_attention import default_tuning

    fwd = lambda **kw: _blocks_label(_fwd_tiles(default_tuning(128, 2, **kw)))
    lines[3:3] = [
      f"Kernel forward tiles (defaults for bf16, D=128): causal {fwd()}; "
      f"non-causal {fwd(causal=False)}; sliding windows {fwd(local=True)} "
      "(block_q x block_k, warps, stages).",
      "",
    ]
  keys = []
  for r in main:
    key = (r["case"], r["B"], r["T"], r["mode"])
    if key not in keys:
      keys.append(key)
  for key in keys:
    by = {r["impl"]: r for r in main if (r["case"], r["B"], r["T"], r["mode"]) == key}
    ours = by.get("pallas", {})

    def tf(name):
      r = by.get(name, {})
      return f"{r['tflops']:.0f}" if "tflops" in r else "—"

    def ratio(name):
      r = by.get(name, {})
      if "ms" in r and "ms" in ours:
        return f"{r['ms'] / ours['ms']:.2f}x"
      return "—"

    ms = f"{ours['ms']:.3f}" if "ms" in ours else "error"
    line = (
      f"| {key[0]} | {key[1]}x{key[2]} | {key[3]} | {ms} | {tf('pallas')} | "
      f"{tf('cudnn')} | {tf('xla')} | {tf('mha')} | {ratio('cudnn')} | "
      f"{ratio('xla')} | {ratio('mha')} |"
    )
    if hop:
      h = by.get("hopper", {})
      line += (f" {h['ms']:.3f} |" if "ms" in h else " — |") + f" {tf('hopper')} |"
      for anchor in ("cudnn", "mha"):
        a = by.get(anchor, {})
        line += f" {a['ms'] / h['ms']:.2f}x |" if "ms" in h and "ms" in a else " — |"
    lines.append(line)

  def ours_ms(case, t, mode):
    for r in main:
      if (r["impl"], r["case"], r["T"], r["mode"]) == ("pallas", case, t, mode) and "ms" in r:
        return r["ms"]

  for mode in ("fwd", "fwdbwd"):
    full, win = ours_ms("causal", 16384, mode), ours_ms("window1024", 16384, mode)
    if full and win:
      lines.append(
        f"\nSliding window 1024 vs full causal at T=16384, {mode}: "
        f"{full / win:.2f}x faster (ideal ~{16384 / 2 / 1024:.0f}x from work)."
      )
  errors = [r for r in main if "error" in r]
  if errors:
    lines += ["", "Implementations that could not run a case:", ""]
    lines += [
      f"- {r['impl']} {r['case']} {r['B']}x{r['T']} {r['mode']}: {r['error']}" for r in errors
    ]
  sw = [r for r in rows if r.get("sweep")]
  if sw:
    lines += [
      "",
      "Block-size candidates (causal, bwd candidates on top of the best fwd):",
      "",
      "| B x T | mode | blocks | ms | TFLOP/s |",
      "|---|---|---|---|---|",
    ]
    for r in sw:
      lines.append(
        f"| {r['B']}x{r['T']} | {r['mode']} | {r['blocks']} | "
        f"{r.get('ms', float('nan')):.3f} | {r.get('tflops', float('nan')):.0f} |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(prog="attnzoo bench attention", description=__doc__)
  p.add_argument("--out-dir", default=os.path.join("experiments", "results", "kernels"))
  p.add_argument(
    "--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS)
  )
  p.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
  p.add_argument(
    "--tune",
    action="store_true",
    help="time block-size candidates first and run the table with the best",
  )
  p.add_argument(
    "--sweep",
    action="store_true",
    help="only time the forward tile candidates (SWEEP_FWD), to *_sweep.{md,json}",
  )
  p.add_argument(
    "--sweep-budget",
    type=float,
    default=240,
    help="seconds after which --sweep starts no more compiles",
  )
  p.add_argument(
    "--hopper",
    choices=tuple(HOPPER_MODES),
    default="auto",
    help="the kernel's forward: auto (Hopper on sm90 where supported), on, off "
    "(Triton), both (Triton as 'pallas' plus the Hopper forward as 'hopper')",
  )
  p.add_argument("--verbose", action="store_true")
  args = p.parse_args(argv)
  args.impls = tuple(args.impls.split(","))
  if args.hopper == "both" and "hopper" not in args.impls:
    args.impls += ("hopper",)
  device = jax.devices()[0].device_kind
  print(f"device: {device}, jax {jax.__version__}", flush=True)
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, f"attention_{device_name()}")
  markdown = to_markdown
  if args.sweep:
    stem, markdown = stem + "_sweep", sweep_markdown
  rows = []

  def save():  # after every measurement, so an interrupted run still leaves its rows
    with open(stem + ".json", "w") as f:
      json.dump(dict(device=device, jax=jax.__version__, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
      f.write(markdown(rows, device))

  if args.sweep:
    sweep(args, rows, save)
    print(sweep_markdown(rows, device), flush=True)
    return 0
  args.tuning = tune(args, rows, save) if args.tune else None
  if args.tuning is not None:
    rows.append(dict(tuned=dataclasses.asdict(args.tuning)))
  run(args, rows, save)
  save()
  print(to_markdown(rows, device), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
