"""`attnzoo train|eval|sweep|bench|demo`; also `python -m attnzoo`.

  attnzoo train --config configs/mqar.py:mixer=attention,d_model=64 --workdir DIR \
      [--config.train.lr=1e-3 ...]
  attnzoo eval --workdir DIR
  attnzoo sweep --config configs/sweeps/mqar_lr.py:mixers=attention --workdir DIR
  attnzoo bench attention|linear|ssm|decode|sparse|sharding [...]
  attnzoo demo [--workdir DIR]
  attnzoo generate --workdir DIR --prompt "ROMEO:" [--max_new_tokens 500 --temperature 0.8
      --top_k 40 --top_p 1.0 --num_samples 1 --seed 0]
  attnzoo data prepare lra/listops --out DIR [--workers N] [--config.data.num_train=...]

User mistakes (bad config keys or values, impossible shapes, unwritable workdirs, a NaN loss)
print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys

from attnzoo.config import ConfigError, load_config_file, parse_value, set_typed


def _apply_overrides(config, overrides: list[str]):
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise ConfigError(f"unrecognised argument {item!r} (overrides look like --config.a.b=value)")
    key, value = item[len("--config.") :].split("=", 1)
    set_typed(config, key, parse_value(value))
  return config


def _config_with_overrides(spec: str, overrides: list[str]):
  return _apply_overrides(load_config_file(spec), overrides)


def _print_table(rows: list[dict], columns: list[str]):
  widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
  line = lambda values: (
    "| " + " | ".join(str(v).ljust(widths[c]) for c, v in zip(columns, values)) + " |"
  )
  print(line(columns))
  print("|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|")
  for r in rows:
    print(line([r.get(c, "") for c in columns]))


def _summary_row(name, summary):
  return {
    "run": name,
    "params": f"{summary['params']:,}",
    "state_size": f"{summary['state_size']:,} B",
    "eval_accuracy": f"{summary['eval/accuracy']:.4f}",
    "steps": summary["step"],
    "wall_time": f"{summary['wall_time_s']:.0f} s",
  }


def cmd_train(args, extra):
  from attnzoo.train.trainer import train

  config = _config_with_overrides(args.config, extra)
  summary = train(config, args.workdir, quiet=args.quiet)
  print(json.dumps(summary, indent=2))


def cmd_eval(args, extra):
  from attnzoo.train.trainer import evaluate

  if extra:
    raise ConfigError(f"eval takes no overrides, got {' '.join(extra)}")
  print(json.dumps(evaluate(args.workdir), indent=2))


def cmd_sweep(args, extra):
  """Runs that differ only in learning rate and seed train packed (attnzoo.train.packed: one
  vmapped program per pack); any other run trains alone."""
  from attnzoo.train.packed import pack_groups, train_packed
  from attnzoo.train.trainer import train

  configs = load_config_file(args.config)
  if not isinstance(configs, (list, tuple)):
    raise ConfigError(f"a sweep config must return a list of configs, got {type(configs).__name__}")
  for config in configs:
    _apply_overrides(config, extra)
  root = pathlib.Path(args.workdir)
  summaries = {}
  for group in pack_groups(configs):
    if len(group) == 1:
      summaries[group[0].name] = train(group[0], root / group[0].name, quiet=args.quiet)
    else:
      done = train_packed(group, [root / c.name for c in group], quiet=args.quiet)
      summaries.update({c.name: s for c, s in zip(group, done)})
  best, rows = {}, []
  for config in configs:
    summary = summaries[config.name]
    rows.append(_summary_row(config.name, summary))
    if (
      config.group not in best or summary["eval/accuracy"] > best[config.group][1]["eval/accuracy"]
    ):
      best[config.group] = (config.name, summary)
  print("\nall runs:")
  _print_table(rows, ["run", "params", "state_size", "eval_accuracy", "steps", "wall_time"])
  print("\nbest over learning rates per setting:")
  _print_table(
    [{"setting": g, **_summary_row(n, s)} for g, (n, s) in best.items()],
    ["setting", "run", "state_size", "eval_accuracy"],
  )
  result = {g: {"run": n, **s} for g, (n, s) in best.items()}
  (pathlib.Path(args.workdir) / "best.json").write_text(json.dumps(result, indent=2))


def cmd_bench(args, extra):
  try:
    module = importlib.import_module(f"attnzoo.bench.{args.name}")
  except ModuleNotFoundError:
    raise ConfigError(f"unknown benchmark {args.name!r}") from None
  module.main(extra)


DEMO_MIXERS = ("attention", "sliding_window", "base_conv+based")


def cmd_demo(args, extra):
  """A few mixers on MQAR (L=64, 4 pairs, a 512-token vocabulary so that a CPU trains it in
  minutes; evaluated every 100 steps, stopping at 0.99), then a table: attention recalls,
  a 16-token sliding window cannot reach keys further back."""
  from attnzoo.mixers import MIXERS
  from attnzoo.train.trainer import train

  root = pathlib.Path(args.workdir)
  rows = []
  for name in {n for m in args.mixers for n in m.split("+")} - set(MIXERS):
    raise ConfigError(f"unknown mixer {name!r}; registered: {', '.join(sorted(MIXERS))}")
  for mixer in (*DEMO_MIXERS, *args.mixers):
    spec = (
      f"configs/mqar.py:mixer={mixer},d_model=64,num_layers=2,seq_len=64,num_kv_pairs=4,"
      f"train_examples=20000,num_steps={args.steps}"
    )
    if mixer == "sliding_window":
      spec += ",window=16"
    config = _config_with_overrides(
      str(_repo_file(spec)), ["--config.data.vocab_size=512", "--config.train.eval_every=100"]
    )
    print(f"training {mixer} ...", flush=True)
    summary = train(config, root / mixer.replace("+", "_"), quiet=True)
    rows.append({"mixer": mixer, **_summary_row(mixer, summary)})
  print()
  _print_table(rows, ["mixer", "params", "state_size", "eval_accuracy", "steps", "wall_time"])


def cmd_generate(args, extra):
  """Samples from the latest checkpoint of an LM run through the mixers' decode paths."""
  import jax
  import numpy as np

  from attnzoo.models import generate
  from attnzoo.train.trainer import load_run

  if extra:
    raise ConfigError(f"generate takes no overrides, got {' '.join(extra)}")
  if args.max_new_tokens <= 0:
    raise ConfigError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
  if args.num_samples <= 0:
    raise ConfigError(f"--num_samples must be positive, got {args.num_samples}")
  _, exp, state = load_run(args.workdir)
  vocabulary = getattr(exp.task, "vocabulary", None)
  if exp.task.model_kind != "causal_lm":
    raise ConfigError(f"{args.workdir!r} holds a {exp.task.name} run, not a language model")
  for i, prompt in enumerate(args.prompt or [""]):
    if vocabulary is not None:
      tokens = vocabulary.encode(prompt)
    else:  # a token-file run: the prompt is token ids
      try:
        tokens = np.array([int(t) for t in prompt.split()], np.int32)
      except ValueError:
        raise ConfigError(f"a token-file run takes prompts of token ids, got {prompt!r}") from None
    if len(tokens) == 0:
      raise ConfigError("the prompt is empty; give --prompt TEXT")
    if tokens.max() >= exp.task.vocab_size:
      raise ConfigError(f"prompt token {tokens.max()} is outside the vocabulary")
    batch = np.broadcast_to(tokens, (args.num_samples, len(tokens)))
    out = generate(
      exp.model,
      state["params"],
      batch,
      args.max_new_tokens,
      rng=jax.random.fold_in(jax.random.key(args.seed), i),
      temperature=args.temperature,
      top_k=args.top_k,
      top_p=args.top_p,
    )
    for row in np.asarray(out):
      text = vocabulary.decode(row) if vocabulary is not None else " ".join(map(str, row))
      print(text, end="\n\n" if vocabulary is not None else "\n", flush=True)


def cmd_data(args, extra):
  """Prepares a task's dataset as shards: the task's config file (configs/<name>.py, with
  --config.data.* overrides) gives the data parameters."""
  from attnzoo.tasks import TASKS

  spec = _repo_file(f"configs/{args.name}.py")
  if not pathlib.Path(spec).is_file():
    raise ConfigError(f"unknown dataset {args.name!r} (no configs/{args.name}.py)")
  config = _config_with_overrides(spec, extra)
  task = TASKS.get(config.task)
  if task is None or not hasattr(task, "prepare"):
    raise ConfigError(f"task {config.task!r} has no data to prepare")
  if args.workers < 1:
    raise ConfigError(f"--workers must be >= 1, got {args.workers}")
  meta = task.prepare(config, args.out, workers=args.workers, progress=not args.quiet)
  print(json.dumps(meta))


def _repo_file(spec: str) -> str:
  """Resolves a config path relative to the repository when not found from the cwd."""
  path, sep, arg = spec.partition(":")
  if not pathlib.Path(path).exists():
    candidate = pathlib.Path(__file__).resolve().parent.parent / path
    if candidate.exists():
      path = str(candidate)
  return path + sep + arg


def main(argv=None):
  parser = argparse.ArgumentParser(prog="attnzoo", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("train", help="train (or resume) one config in a workdir")
  p.add_argument("--config", required=True, help="path/to/config.py[:k=v,...]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(fn=cmd_train)
  p = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
  p.add_argument("--workdir", required=True)
  p.set_defaults(fn=cmd_eval)
  p = sub.add_parser("sweep", help="train every config of a sweep, report the best per setting")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--quiet", action="store_true")
  p.set_defaults(fn=cmd_sweep)
  p = sub.add_parser("bench", help="kernel benchmarks (run on the accelerator)", add_help=False)
  p.add_argument("name", help="attention | linear | ssm | decode | sparse | sharding")
  p.set_defaults(fn=cmd_bench)
  p = sub.add_parser("demo", help="train a few mixers on MQAR and print a table")
  p.add_argument("--workdir", default="workdirs/demo")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--mixers", nargs="*", default=[], help="more registered mixers to include")
  p.set_defaults(fn=cmd_demo)
  p = sub.add_parser("generate", help="sample text from an LM run's latest checkpoint")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", action="append", help="repeat for several prompts")
  p.add_argument("--max_new_tokens", type=int, default=500)
  p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
  p.add_argument("--top_k", type=int, default=0, help="0: no top-k cut")
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--num_samples", type=int, default=1, help="samples per prompt (one batch)")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(fn=cmd_generate)
  p = sub.add_parser(
    "data", help="prepare a dataset as shards (data prepare lra/listops --out DIR)"
  )
  p.add_argument("action", choices=["prepare"])
  p.add_argument("name", help="lra/listops | lra/pathfinder | lra/pathx")
  p.add_argument("--out", required=True)
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(fn=cmd_data)
  args, extra = parser.parse_known_args(argv)
  if args.command in ("train", "sweep"):
    args.config = _repo_file(args.config)
  try:
    args.fn(args, extra)
  except (ConfigError, ValueError, NotImplementedError) as e:
    if os.environ.get("ATTNZOO_DEBUG"):
      raise
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2
  except RuntimeError as e:  # TrainingError and friends
    from attnzoo.train.trainer import TrainingError

    if not isinstance(e, TrainingError) or os.environ.get("ATTNZOO_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def run():
  sys.exit(main())
