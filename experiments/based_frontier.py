"""The recall-memory frontier of the Based paper's Figure 2 (Arora et al. 2024, "Simple linear
attention language models balance the recall-throughput tradeoff"): MQAR accuracy against the
recurrent state a model keeps while decoding (bytes, float32, summed over layers, at the longest
test length 1024, as Zoology's `state_size`), for every recurrent family in the zoo, with
attention (a KV cache that grows with the sequence) as the ceiling.

  python experiments/based_frontier.py                          # every model setting (resumes)
  python experiments/based_frontier.py --models based,mamba,h3 --epochs 8 --time_budget_s 480
  python experiments/based_frontier.py --report_only

Protocol: `configs/mqar.py:preset=based` (Zoology's trainer on the Based paper's mixed-length
data, 4 learning rates logspace(-3, -1.5, 4), the best one reported). Settings follow the
paper's sweep where it has one (`arxiv24_based_figure2/configs.py`): attention, Based and
sliding window as [BaseConv(k=3), X] hybrids; Mamba and Mamba-2 over d_state; Hyena and H3
alone. Families the paper does not sweep get d_model in {64, 128, 256} with their defaults,
as [BaseConv, X] hybrids for the attention-like ones (linear attentions, delta rules, GLA,
RetNet, HGRN2, RWKV-6) and alone for the convolutions and SSMs. Each setting's learning rates
train as one packed program; records go to <out>/frontier.json (a recorded setting is not
re-run); <out>/frontier.md and <out>/frontier.png are rewritten on every call.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from attnzoo.config import load_config_file, set_typed  # noqa: E402

_spec = importlib.util.spec_from_file_location("zoology_fig2", HERE / "zoology_fig2.py")
fig2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fig2)

LRS = tuple(float(x) for x in np.logspace(-3, -1.5, 4))
WIDTHS = (64, 128, 256)
# model -> (mixer spec, [(d_model, {mixer option: value})])
MODELS = {
  "attention": ("base_conv+attention", [(d, {}) for d in (64, 128)]),
  "based": (
    "base_conv+based",
    [(d, {"feature_dim": f}) for d in (48, 64, 128) for f in (8, 16, 24)],
  ),
  "sliding_window": ("base_conv+sliding_window", [(128, {"window": w}) for w in (16, 64, 256)]),
  "mamba": ("mamba", [(d, {"d_state": n}) for d in WIDTHS for n in (8, 16, 24)]),
  "mamba2": ("mamba2", [(d, {"d_state": n}) for d in WIDTHS for n in (8, 16, 24)]),
  "hyena": ("hyena", [(d, {}) for d in WIDTHS]),
  "h3": ("h3", [(d, {}) for d in WIDTHS]),
  **{
    name: (f"base_conv+{name}", [(d, {}) for d in WIDTHS])
    for name in (
      "linear_attention",
      "gla",
      "deltanet",
      "gated_deltanet",
      "retnet",
      "hgrn2",
      "rwkv6",
      "lightning",
    )
  },
  **{name: (name, [(d, {}) for d in WIDTHS]) for name in ("rwkv4", "s4d", "dss")},
}
# What the Based paper's Figure 2 shows (read off arxiv24_based_figure2/figure.png, see
# ../shared/research/zoology_fig2.md): ranges over its settings, no per-setting numbers.
PAPER = {
  "attention": "1.0",
  "based": "~0.95-1.0 from ~2^16 bytes",
  "mamba": "~0.55-0.9",
  "h3": "<= 0.36",
  "hyena": "<= 0.5",
}


def setting_key(model: str, d: int, options: dict) -> str:
  return "_".join([model, f"d{d}", *(f"{k}{v}" for k, v in options.items())])


def setting_configs(model: str, d: int, options: dict, args) -> list:
  spec, _ = MODELS[model]
  names = spec.split("+")
  configs = []
  for lr in args.lrs:
    knobs = {"preset": "based", "mixer": spec, "d_model": d, "lr": lr, "epochs": args.epochs}
    knobs.update(
      {
        k: getattr(args, k)
        for k in ("train_examples", "test_examples", "batch_size")
        if getattr(args, k)
      }
    )
    c = load_config_file(
      f"{REPO}/configs/mqar.py:" + ",".join(f"{k}={v}" for k, v in knobs.items())
    )
    for option, value in options.items():
      prefix = f"model.mixer_kwargs.{names[-1]}." if len(names) > 1 else "model.mixer_kwargs."
      set_typed(c, prefix + option, value)
    if args.vocab_size:
      set_typed(c, "data.vocab_size", args.vocab_size)
    if args.max_steps:
      set_typed(c, "train.num_steps", min(c.train.num_steps, args.max_steps))
    fig2.set_implementation(c, args.implementation)
    fig2.set_checkpoint_epochs(c, args.checkpoint_epochs)
    c.name = f"lr{lr:.3g}"
    configs.append(c)
  return configs


def run_setting(model: str, d: int, options: dict, args) -> dict:
  configs = setting_configs(model, d, options, args)
  root = pathlib.Path(args.workdir) / setting_key(model, d, options)
  record = fig2.train_lrs(configs, root)
  protocol = {k: getattr(args, k) for k in ("epochs", "max_steps", "train_examples", "vocab_size")}
  return {"model": model, "d": d, "options": options, **record, "protocol": protocol}


def write_report(out: pathlib.Path, cells: dict) -> None:
  rows = sorted(cells.values(), key=lambda c: (list(MODELS).index(c["model"]), c["state_size"]))
  lines = [
    "# The recall-memory frontier (Based paper, Figure 2): MQAR accuracy against state size",
    "",
    "Protocol: `configs/mqar.py:preset=based`, best of the learning rates; state: bytes kept",
    "while decoding at length 1024 (float32, all layers). Written by",
    "experiments/based_frontier.py.",
    "",
    "| model | d_model | options | state (bytes) | accuracy | best lr | steps | paper (range) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for c in rows:
    options = ", ".join(f"{k}={v}" for k, v in c["options"].items()) or "-"
    steps = max(c["steps"].values())
    lines.append(
      f"| {c['model']} | {c['d']} | {options} | {c['state_size']:,} | {c['accuracy']:.3f} | "
      f"{c['best_lr']:.3g} | {steps} | {PAPER.get(c['model'], '-')} |"
    )
  proto = {tuple(sorted(c["protocol"].items())) for c in cells.values()}
  lines += ["", "Protocol options: " + "; ".join(str(dict(p)) for p in sorted(proto))]
  (out / "frontier.md").write_text("\n".join(lines) + "\n")
  draw(out / "frontier.png", cells)


def draw(path: pathlib.Path, cells: dict) -> None:
  """Accuracy against state bytes (log scale), one marker series per model."""
  fig, ax = plt.subplots(figsize=(7, 4.2))
  cmap = plt.get_cmap("tab20")
  for i, model in enumerate(MODELS):
    pts = sorted((c["state_size"], c["accuracy"]) for c in cells.values() if c["model"] == model)
    if pts:
      style = "s--" if model == "attention" else "o-"
      ax.plot(*zip(*pts), style, color=cmap(i % 20), label=model, ms=4, lw=1)
  ax.set_xscale("log", base=2)
  ax.set_ylim(-0.03, 1.03)
  ax.set_xlabel("recurrent state size (bytes)")
  ax.set_ylabel("MQAR accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
  p.add_argument(
    "--d",
    type=lambda s: [int(x) for x in s.split(",")],
    default=None,
    help="keep only these widths",
  )
  p.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=list(LRS))
  p.add_argument("--epochs", type=int, default=32)
  p.add_argument("--max_steps", type=int, default=0)
  p.add_argument("--train_examples", type=int, default=0, help="0: the paper's 100k")
  p.add_argument("--test_examples", type=int, default=0, help="0: the paper's 1000")
  p.add_argument("--batch_size", type=int, default=0, help="0: the paper's 256")
  p.add_argument("--vocab_size", type=int, default=0)
  p.add_argument("--implementation", default="", help="e.g. xla: every mixer's (default auto)")
  p.add_argument("--checkpoint_epochs", type=int, default=0, help="0: every 8 epochs")
  p.add_argument("--time_budget_s", type=float, default=0)
  p.add_argument("--out", default=str(REPO / "experiments/results/zoology"))
  p.add_argument("--workdir", default=str(REPO / "workdirs/based_frontier"))
  p.add_argument("--report_only", action="store_true")
  args = p.parse_args(argv)
  unknown = set(args.models) - set(MODELS)
  if unknown:
    print(
      f"error: unknown model(s) {', '.join(sorted(unknown))}; use {', '.join(MODELS)}",
      file=sys.stderr,
    )
    return 2
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  cells = fig2.load_cells(out, "frontier.json")
  jobs = [
    (setting_key(m, d, o), m, lambda m=m, d=d, o=o: run_setting(m, d, o, args))
    for m in args.models
    for d, o in MODELS[m][1]
    if args.d is None or d in args.d
  ]
  if not args.report_only and fig2.run_pending(
    out, cells, jobs, args.time_budget_s, "frontier.json"
  ):
    print("all settings recorded")
  if cells:
    write_report(out, cells)
  return 0


if __name__ == "__main__":
  sys.exit(main())
