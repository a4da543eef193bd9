"""`attnzoo bench decode`: decoding speed and decoding-state memory of every causal mixer.

The model is configs/lm.py's recipe LM (6 layers, width 384, 6 heads where the mixer has heads,
GELU MLP) over a 256-token (byte) vocabulary, without learned positions, random parameters, in
bf16 on a GPU/TPU (float32 on CPU). For each mixer, batch size and context length L, the cache
holds a context of L tokens (filled synthetically: a decoding step's cost does not depend on
the cached values) and `--steps` greedy one-token steps run in one jitted `lax.scan`; tokens/s =
batch x steps / the median time (attnzoo.bench.timing). Memory is the bytes of the decoding
cache (attention: the KV cache, growing with L; recurrent families: their state, flat in L).
The last table gives each mixer's speed over softmax attention's at the longest context.
Writes experiments/results/decode/decode_<device>.{md,json}; a case that does not fit in
memory is recorded as such.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import traceback

import jax
import jax.numpy as jnp

from attnzoo.bench.timing import median_seconds
from attnzoo.config import load_config_file, set_typed
from attnzoo.mixers import MIXERS
from attnzoo.models import build_model
from attnzoo.models.lm import init_cache
from attnzoo.train.trainer import compute_dtype

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "lm.py"
TINY = "d_model=32,num_layers=2"


def device_name() -> str:
  device = jax.devices()[0]
  kind = device.device_kind if device.platform != "cpu" else "cpu"
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def bench_model(mixer: str, tiny: bool):
  config = load_config_file(f"{CONFIG}:mixer={mixer}" + (f",{TINY}" if tiny else ""))
  set_typed(config, "model.position_embedding", "none")
  for key in ("embedding_dropout", "residual_dropout"):
    set_typed(config, f"model.{key}", 0.0)
  return build_model("causal_lm", config.model, compute_dtype("auto"), vocab_size=256)


def filled_cache(model, batch: int, context: int, steps: int):
  """A cache of context + steps slots that holds `context` tokens: the decoding index and every
  cached position say so (keys, values and states stay zero)."""
  cache = init_cache(model, batch, context + steps)

  def fill(path, leaf):
    name = path[-1].key
    if name == "index":
      return jnp.full_like(leaf, context)
    if name == "positions":  # KV-cache slot positions: slots < context are in use
      slots = jnp.arange(leaf.shape[1], dtype=leaf.dtype)
      return jnp.broadcast_to(jnp.where(slots < context, slots, leaf[0]), leaf.shape)
    return leaf

  return jax.tree_util.tree_map_with_path(fill, cache)


def decode_steps(model, steps: int):
  @jax.jit
  def run(params, cache, token):
    def step(carry, _):
      cache, token = carry
      logits, variables = model.apply(
        {"params": params, "cache": cache}, token, decode=True, mutable=["cache"]
      )
      return (variables["cache"], jnp.argmax(logits[:, -1], -1)[:, None].astype(token.dtype)), None

    (_, token), _ = jax.lax.scan(step, (cache, token), None, length=steps)
    return token

  return run


def measure(mixer: str, batch: int, context: int, steps: int, tiny: bool) -> dict:
  model = bench_model(mixer, tiny)
  token = jnp.zeros((batch, 1), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), token)["params"]
  cache = filled_cache(model, batch, context, steps)
  cache_bytes = int(sum(x.nbytes for x in jax.tree.leaves(cache)))
  seconds = median_seconds(decode_steps(model, steps), params, cache, token, reps=3)
  return {
    "tokens_per_s": batch * steps / seconds,
    "ms_per_step": 1e3 * seconds / steps,
    "cache_bytes": cache_bytes,
  }


def write(results: dict, out: pathlib.Path, device: str, contexts, batches, settings: str):
  out.with_suffix(".json").write_text(json.dumps(results, indent=2, sort_keys=True))
  mixers = sorted({r["mixer"] for r in results.values()})
  cell = lambda m, b, L, f: results.get(f"{m}/B{b}/L{L}", {}).get(f)
  mib = lambda m, b, L: (
    None if cell(m, b, L, "cache_bytes") is None else (cell(m, b, L, "cache_bytes") / 2**20)
  )
  fmt = lambda v, spec: "—" if v is None else format(v, spec)
  lines = [f"# Decoding speed and state memory on {device}\n\n", __doc__.split("\n\n")[1]]
  lines.append(f"\n\nThis run: {settings}.\n")
  for b in batches:
    head = " | ".join(f"{L} tok/s | {L} cache MiB" for L in contexts)
    lines += [f"\n## batch {b}\n\n| mixer | {head} |\n|---|" + "---|" * 2 * len(contexts) + "\n"]
    for m in mixers:
      cells = [
        "OOM/err | OOM/err"  # recorded as failed; "—": not measured
        if "error" in results.get(f"{m}/B{b}/L{L}", {})
        else f"{fmt(cell(m, b, L, 'tokens_per_s'), ',.0f')} | {fmt(mib(m, b, L), ',.2f')}"
        for L in contexts
      ]
      lines.append(f"| {m} | {' | '.join(cells)} |\n")
  longest = max(contexts)
  lines += [f"\n## speed over attention at context {longest}\n\n| mixer | "]
  lines += [" | ".join(f"batch {b}" for b in batches), " |\n|---|" + "---|" * len(batches) + "\n"]
  for m in mixers:
    ratios = []
    for b in batches:
      mine, ref = cell(m, b, longest, "tokens_per_s"), cell("attention", b, longest, "tokens_per_s")
      ratios.append("n/a" if mine is None or ref is None else f"{mine / ref:.1f}x")
    lines.append(f"| {m} | {' | '.join(ratios)} |\n")
  out.with_suffix(".md").write_text("".join(lines))


def main(argv=None):
  p = argparse.ArgumentParser(prog="attnzoo bench decode", description=__doc__.split("\n")[0])
  p.add_argument("--mixers", default=",".join(sorted(MIXERS)))
  p.add_argument("--batches", default="1,64")
  p.add_argument("--contexts", default="1024,8192,32768")
  p.add_argument("--steps", type=int, default=16)
  p.add_argument("--tiny", action="store_true", help="CPU smoke: width 32, 2 layers, short")
  p.add_argument("--out-dir", default=str(pathlib.Path("experiments") / "results" / "decode"))
  args = p.parse_args(argv)
  mixers = [m for m in args.mixers.split(",") if m]
  unknown = sorted(set(mixers) - set(MIXERS))
  if unknown:
    raise ValueError(f"unknown mixer(s) {', '.join(unknown)}; registered: {', '.join(MIXERS)}")
  batches = [int(b) for b in args.batches.split(",")]
  contexts = [int(c) for c in args.contexts.split(",")]
  if args.tiny and args.contexts == p.get_default("contexts"):
    contexts, batches, args.steps = [64, 256], [1, 4], 4
  device = device_name() + ("_tiny" if args.tiny else "")
  out = pathlib.Path(args.out_dir) / f"decode_{device}"
  out.parent.mkdir(parents=True, exist_ok=True)
  results = (
    json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
  )
  dtype = jnp.dtype(compute_dtype("auto")).name
  settings = f"{TINY if args.tiny else 'the recipe LM'}, {dtype}, {args.steps} steps timed per call"
  for mixer in mixers:
    for b in batches:
      for L in contexts:
        key = f"{mixer}/B{b}/L{L}"
        try:
          results[key] = {"mixer": mixer, **measure(mixer, b, L, args.steps, args.tiny)}
          r = results[key]
          print(f"{key}: {r['tokens_per_s']:,.0f} tok/s, cache {r['cache_bytes'] / 2**20:,.1f} MiB")
        except Exception as e:  # out of memory and friends: recorded, the sweep goes on
          results[key] = {"mixer": mixer, "error": str(e).splitlines()[0][:200]}
          print(f"{key}: failed: {results[key]['error']}")
          traceback.print_exc(limit=1)
        write(results, out, device, contexts, batches, settings)
  print(f"wrote {out}.md/.json")
