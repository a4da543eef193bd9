"""The LRA table: every bidirectional mixer family on ListOps and Pathfinder-32 (and Path-X on
request), beside the LRA paper's numbers (Tay et al. 2021, Table 1) and S4's.

  python experiments/lra_table.py --data-root DATA --workdir W [--tasks listops,pathfinder]
      [--mixers attention,gla,...] [--setting lra|s4] [--steps N] [--seed S] [--tiny]
  python experiments/lra_table.py --collect ROWS.json ... --out PATH   (merge lanes' rows)

DATA/<task> holds the shards of `attnzoo data prepare lra/<task> --out DATA/<task>`; without
--data-root the splits are generated in memory (as --tiny does, on CPU in about a minute).
Each run trains configs/lra/<task>.py with that mixer; the reported test accuracy is the one at
the evaluation with the best validation accuracy (LRA's protocol). Writes
experiments/results/lra/lra_table_<setting>[_tiny].{md,json} (or --out).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from attnzoo.config import load_config_file, parse_value, set_typed  # noqa: E402
from attnzoo.mixers.registry import bidirectional_mixers  # noqa: E402
from attnzoo.train.logging import read_metrics  # noqa: E402
from attnzoo.train.trainer import train  # noqa: E402

# LRA Table 1 (accuracy %) and later state-space results (S4 ICLR'22 final), for reference.
PAPER = {
  "listops": {
    "Transformer": 36.37,
    "Local Attention": 15.82,
    "Linear Trans.": 16.13,
    "Performer": 18.01,
    "BigBird": 36.05,
    "S4 (Gu et al. 2022)": 59.60,
    "Mega (Ma et al. 2023)": 63.14,
  },
  "pathfinder": {
    "Transformer": 71.40,
    "Local Attention": 66.63,
    "Linear Trans.": 75.30,
    "Performer": 77.05,
    "BigBird": 74.87,
    "S4 (Gu et al. 2022)": 94.20,
    "Mega (Ma et al. 2023)": 96.01,
  },
  "pathx": {"Transformer": None, "S4 (Gu et al. 2022)": 96.35},
}
SAME_FAMILY = {
  "attention": "Transformer",
  "sliding_window": "Local Attention",
  "linear_attention": "Linear Trans.",
}
TINY = {
  "listops": "d_model=16,num_layers=1,num_heads=2,batch_size=8,num_train=64,num_val=16,"
  "num_test=16,min_length=5,max_length=64",
  "pathfinder": "d_model=16,num_layers=1,num_heads=2,batch_size=8,num_train=32,num_val=8,"
  "num_test=8,difficulty=easy",
  "pathx": "d_model=16,num_layers=1,num_heads=2,batch_size=2,num_train=4,num_val=2,num_test=2,"
  "difficulty=easy",
}


def run_one(task, mixer, args) -> dict:
  knobs = [f"mixer={mixer}", f"setting={args.setting}", f"seed={args.seed}"]
  if args.tiny:
    knobs.append(TINY[task])
  if args.data_root:
    knobs.append(f"data_dir={pathlib.Path(args.data_root) / task}")
  spec = f"{REPO}/configs/lra/{task}.py:{','.join(knobs)}"
  config = load_config_file(spec)
  overrides = dict(args.override)
  if args.steps:
    overrides["train.num_steps"] = args.steps
  if args.tiny:
    overrides.update({"train.log_every": 5, "train.eval_every": 5, "train.checkpoint_every": 10})
  if args.eval_every:
    overrides["train.eval_every"] = args.eval_every
    overrides["train.checkpoint_every"] = args.eval_every * config.train.log_every
  for key, value in overrides.items():
    set_typed(config, key, value)
  workdir = pathlib.Path(args.workdir) / task / mixer
  start = time.time()
  summary = train(config, workdir, quiet=True)
  evals = [m for m in read_metrics(workdir) if "eval/accuracy/val" in m]
  best = max(evals, key=lambda m: (m["eval/accuracy/val"], -m["step"]))
  return {
    "task": task,
    "mixer": mixer,
    "val": 100 * best["eval/accuracy/val"],
    "test": 100 * best["eval/accuracy/test"],
    "best_step": best["step"],
    "steps": summary["step"],
    "params": summary["params"],
    "wall_s": round(time.time() - start, 1),
    "config": spec.replace(str(REPO) + "/", ""),
    "overrides": {k: v for k, v in overrides.items()},
    "seed": args.seed,
  }


def table(rows: list[dict], tasks: list[str]) -> str:
  lines = [
    "| family | "
    + " | ".join(f"{t} test (val)" for t in tasks)
    + " | paper row: "
    + " / ".join(tasks)
    + " |",
    "|---|" + "---|" * (len(tasks) + 1),
  ]
  mixers = list(dict.fromkeys(r["mixer"] for r in rows))
  for mixer in mixers:
    cells = []
    for task in tasks:
      row = next((r for r in rows if r["mixer"] == mixer and r["task"] == task), None)
      cells.append("—" if row is None else f"{row['test']:.2f} ({row['val']:.2f})")
    paper = SAME_FAMILY.get(mixer)
    ref = f"{paper}: " + " / ".join(str(PAPER[t].get(paper, "—")) for t in tasks) if paper else "—"
    lines.append(f"| {mixer} | " + " | ".join(cells) + f" | {ref} |")
  lines += ["", "Published (accuracy %):", "", "| model | " + " | ".join(tasks) + " |"]
  lines.append("|---|" + "---|" * len(tasks))
  names = list(dict.fromkeys(n for t in tasks for n in PAPER[t]))
  for name in names:
    values = [PAPER[t].get(name) for t in tasks]
    lines.append(
      f"| {name} | " + " | ".join("FAIL" if v is None else f"{v:.2f}" for v in values) + " |"
    )
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", default="listops,pathfinder")
  parser.add_argument("--mixers", default="", help="comma-separated; default: every bidirectional")
  parser.add_argument("--setting", default="lra", choices=["lra", "s4"])
  parser.add_argument("--data-root", default="")
  parser.add_argument("--workdir", default="")
  parser.add_argument("--collect", nargs="*", default=None, help="row files to merge")
  parser.add_argument("--steps", type=int, default=0, help="override train.num_steps")
  parser.add_argument("--eval-every", type=int, default=0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tiny", action="store_true", help="a CPU-sized smoke run")
  parser.add_argument(
    "--override",
    action="append",
    default=[],
    type=lambda s: tuple(s.split("=", 1)),
    help="config key=value (repeatable), e.g. train.lr=5e-4",
  )
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  if args.collect is not None:
    rows = [r for f in args.collect for r in json.loads(pathlib.Path(f).read_text())]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    return write(rows, tasks, pathlib.Path(args.out), args.setting, False, args.seed)
  if not args.workdir:
    parser.error("--workdir is required")
  args.override = [(k, parse_value(v)) for k, v in args.override]
  tasks = [t for t in args.tasks.split(",") if t]
  mixers = [m for m in args.mixers.split(",") if m] or bidirectional_mixers()
  suffix = f"{args.setting}{'_tiny' if args.tiny else ''}"
  out = pathlib.Path(args.out or REPO / "experiments/results/lra" / f"lra_table_{suffix}")
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = []
  for task in tasks:
    for mixer in mixers:
      row = run_one(task, mixer, args)
      print(json.dumps(row), flush=True)
      rows.append(row)
      out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
  write(rows, tasks, out, args.setting, args.tiny, args.seed)


def write(rows, tasks, out: pathlib.Path, setting: str, tiny: bool, seed: int) -> None:
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
  text = table(rows, tasks)
  out.with_suffix(".md").write_text(
    f"# LRA, setting {setting}{' (tiny CPU smoke run, not a result)' if tiny else ''}"
    f"\n\nTest accuracy % at the best validation accuracy (validation in parentheses); seed "
    f"{seed}; config, overrides, steps, parameters and wall time per row in "
    f"{out.with_suffix('.json').name}.\n\n" + text + "\n"
  )
  print(text)


if __name__ == "__main__":
  main()
