"""Tiny Shakespeare (character level) for every causal mixer at nanoGPT's shakespeare-char recipe
(configs/lm.py: 6 layers, width 384, 6 heads where the mixer has heads, context 256, batch 64,
dropout 0.2, AdamW b2 0.99, lr 1e-3, 100 warm-up steps, cosine to 1e-4, 5,000 steps; bf16 on a
GPU), plus the hybrid-ratio study of "A Systematic Analysis of Hybrid Linear Attention" (seed
#15): gated_deltanet, hgrn2 and gla with full softmax attention at linear:full 1:1, 3:1, 6:1.

  python experiments/lm_shakespeare.py [--mixers attention gla ...] [--hybrids] [--tiny]

Each run trains (or resumes, or just reads its finished summary) in WORKDIR/<run>, then its
decoding speed is measured (greedy, batch 64, 1-token prompt, 255 new tokens, the second call
timed). Results are merged into experiments/results/lm/shakespeare_<device>.json by run name,
so the table fills over several invocations; the .md table and a PNG of the validation-loss
curves are rewritten from the whole JSON each time.

A hybrid r:1 repeats (r linear layers, 1 attention layer); its depth is the multiple of r + 1
nearest the recipe's 6 (1:1 -> 6, 3:1 -> 8, 6:1 -> 7 layers), so every ratio is exact; the
parameter count in the table says what that costs. `--tiny` shrinks everything (width 32,
2 layers, context 32, 20 steps) for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from attnzoo.config import load_config_file, set_typed  # noqa: E402
from attnzoo.mixers import MIXERS  # noqa: E402
from attnzoo.models import generate  # noqa: E402
from attnzoo.train.logging import read_metrics  # noqa: E402
from attnzoo.train.trainer import load_run, train  # noqa: E402

HYBRID_LINEAR = ("gated_deltanet", "hgrn2", "gla")
HYBRID_RATIOS = (1, 3, 6)
NANOGPT_VAL_LOSS = 1.4697  # nanoGPT's README, shakespeare-char, the same recipe
TINY = "d_model=32,num_layers=2,seq_len=32,batch_size=8,num_steps=20"
TINY_OVERRIDES = {
  "data.eval_windows": 16,
  "train.warmup_steps": 2,
  "train.log_every": 5,
  "train.eval_every": 10,
  "train.checkpoint_every": 10,
}


def device_name() -> str:
  device = jax.devices()[0]
  kind = device.device_kind if device.platform != "cpu" else "cpu"
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def hybrid(linear: str, ratio: int, tiny: bool) -> tuple[str, str, int]:
  """(run name, mixer spec, number of layers) of a linear:full = ratio:1 hybrid."""
  spec = "+".join([linear] * ratio + ["attention"])
  layers = (ratio + 1) * max(1, round((2 if tiny else 6) / (ratio + 1)))
  return f"{linear}+attention {ratio}:1", spec, layers


def run_config(mixer: str, num_layers: int | None, tiny: bool):
  knobs = f"mixer={mixer}" + (f",{TINY}" if tiny else "")
  config = load_config_file(f"{REPO}/configs/lm.py:{knobs}")
  for key, value in (TINY_OVERRIDES if tiny else {}).items():
    set_typed(config, key, value)
  if num_layers is not None:
    set_typed(config, "model.num_layers", num_layers)
  return config


def decode_tokens_per_s(workdir: pathlib.Path, batch: int = 64) -> float:
  """Greedy generation from a 1-token prompt to the full context, the second call timed."""
  config, exp, state = load_run(workdir)
  prompt = np.zeros((batch, 1), np.int32)
  new = config.data.seq_len - 1
  run = lambda: generate(exp.model, state["params"], prompt, new).block_until_ready()
  run()
  start = time.perf_counter()
  run()
  return batch * new / (time.perf_counter() - start)


def measure(name: str, mixer: str, num_layers: int | None, root: pathlib.Path, tiny: bool):
  config = run_config(mixer, num_layers, tiny)
  workdir = root / re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)
  print(f"== {name}: {workdir}", flush=True)
  summary = train(config, workdir, quiet=True)
  metrics = read_metrics(workdir)
  throughput = [m["throughput/tokens_per_s"] for m in metrics if "throughput/tokens_per_s" in m]
  curve = [(m["step"], m["eval/loss"]) for m in metrics if "eval/loss" in m]
  return {
    "mixer": mixer,
    "num_layers": config.model.num_layers,
    "steps": summary["step"],
    "val_loss": summary["eval/loss"],
    "bits_per_char": summary["eval/bits_per_char"],
    "params": summary["params"],
    "state_size": summary["state_size"],
    # the first window includes compilation
    "train_tokens_per_s": float(np.median(throughput[1:] or throughput)),
    "decode_tokens_per_s": decode_tokens_per_s(workdir),
    "wall_time_s": summary["wall_time_s"],
    "curve": curve,
    "tiny": tiny,
  }


def best(result: dict) -> tuple[int, float]:
  """(step, loss) of the lowest validation loss of a run's evaluations."""
  return min(result["curve"], key=lambda point: point[1])


def write_tables(results: dict, path: pathlib.Path, device: str):
  path.with_suffix(".json").write_text(json.dumps(results, indent=2, sort_keys=True))
  header = (
    "| run | layers | best val loss (step) | bits/char at best | final val loss | params | "
    "state size (B, full context) | train tok/s | decode tok/s (B=64) | steps |\n"
    "|---|---|---|---|---|---|---|---|---|---|\n"
  )
  row = lambda n, r: (
    f"| {n} | {r['num_layers']} | {best(r)[1]:.4f} ({best(r)[0]}) | "
    f"{best(r)[1] / np.log(2):.4f} | {r['val_loss']:.4f} | "
    f"{r['params']:,} | {r['state_size']:,} | {r['train_tokens_per_s']:,.0f} | "
    f"{r['decode_tokens_per_s']:,.0f} | {r['steps']} |\n"
  )
  single = {n: r for n, r in results.items() if "+" not in r["mixer"]}
  hybrids = {n: r for n, r in results.items() if "+" in r["mixer"]}
  text = [
    f"# Tiny Shakespeare, character level, on {device}\n\n",
    "Written by `experiments/lm_shakespeare.py` (configs/lm.py, nanoGPT's shakespeare-char "
    f"recipe, seed 0). nanoGPT reports validation loss {NANOGPT_VAL_LOSS} for its Transformer. "
    "Decode: greedy, batch 64, 1-token prompt, new tokens up to the full context. "
    "Best = the lowest validation loss of the evaluations (every 250 steps), the number nanoGPT "
    "reports (it keeps the checkpoint of its best evaluation); final = at the last step.\n\n",
  ]
  if any(r["tiny"] for r in results.values()):
    text.append("**Tiny smoke settings (--tiny): not the recipe; numbers are not comparable.**\n\n")
  if single:
    text += ["## Every mixer\n\n", header, *(row(n, r) for n, r in sorted(single.items()))]
  if hybrids:
    text += ["\n## Hybrids (linear:full attention), seed #15\n\n", header]
    text += [row(n, r) for n, r in sorted(hybrids.items())]
  path.with_suffix(".md").write_text("".join(text))
  plot(results, path.with_suffix(".png"), device)


def plot(results: dict, path: pathlib.Path, device: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
  for ax, hybrids in zip(axes, (False, True)):
    for name, r in sorted(results.items()):
      if ("+" in r["mixer"]) == hybrids and r["curve"]:
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, label=name)
    ax.axhline(NANOGPT_VAL_LOSS, color="gray", ls="--", lw=0.8, label="nanoGPT 1.4697")
    ax.set(xlabel="step", title="hybrids" if hybrids else "single mixers")
    ax.legend(fontsize=7)
  axes[0].set_ylabel("validation loss (nats/char)")
  fig.suptitle(f"tiny Shakespeare on {device}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mixers", nargs="*", default=None, help="default: every mixer")
  parser.add_argument("--hybrids", action="store_true", help="also the hybrid-ratio study")
  parser.add_argument("--hybrids_only", action="store_true")
  parser.add_argument("--tiny", action="store_true", help="CPU smoke settings")
  parser.add_argument("--workdir", default=str(REPO / "workdirs" / "lm_shakespeare"))
  parser.add_argument("--results", default=str(REPO / "experiments" / "results" / "lm"))
  args = parser.parse_args(argv)
  mixers = [] if args.hybrids_only else (args.mixers or sorted(MIXERS))
  unknown = sorted(set(mixers) - set(MIXERS))
  if unknown:
    parser.error(f"unknown mixer(s) {', '.join(unknown)}")
  runs = [(m, m, None) for m in mixers]
  if args.hybrids or args.hybrids_only:
    runs += [hybrid(lin, r, args.tiny) for lin in HYBRID_LINEAR for r in HYBRID_RATIOS]
  device = device_name() + ("_tiny" if args.tiny else "")
  out = pathlib.Path(args.results) / f"shakespeare_{device}"
  out.parent.mkdir(parents=True, exist_ok=True)
  results = (
    json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
  )
  root = pathlib.Path(args.workdir) / device
  for name, mixer, layers in runs:
    results[name] = measure(name, mixer, layers, root, args.tiny)
    r = results[name]
    print(f"   val loss {r['val_loss']:.4f}, bits/char {r['bits_per_char']:.4f}", flush=True)
    write_tables(results, out, device)
  print(f"wrote {out}.md/.json/.png")


if __name__ == "__main__":
  main()
