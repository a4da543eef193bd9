"""An MQAR table for any set of causal mixers next to attention, at Zoology's (L=256, kv=16)
with d_model=128 and 2 layers (configs/mqar.py; one learning rate, not Zoology's sweep). Runs
`attnzoo train` for each mixer, several at once on one device (small models are launch-bound),
every run under a wall-clock cap, and writes `<out>/<name>.md` and `.json`: final eval
accuracy, the bytes of the decoding state (`state_size`), parameters, steps and wall time per
mixer (a run stopped by its cap reports its last evaluation).

  python experiments/mqar_table.py --name mqar_ssm --mixers attention,s4d,... [--steps 2000]
  python experiments/mqar_table.py --tiny --out /tmp/mqar_tiny      (CPU smoke run, meaningless)

The issue tables: `--name mqar_ssm` (the default mixers: issue #17's families) and
`--name mqar_variants` (issue #18's softmax variants, experiments/gpu/mqar_variants.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Overrides for mixers whose defaults do not fit (L=256, d=128): base_conv alternates a short
# and a long convolution (Zoology's Figure 2); NSA's paper blocks (window 512) would cover the
# whole sequence, so it gets blocks scaled to L=256 (the NSA helper's suggestion); sinkhorn's
# causal form is O(T^3), so it trains 500 steps.
OVERRIDES = {
  "base_conv": ["--config.model.mixer_kwargs.layer_kernel_sizes=(3,-1)"],
  "nsa": [
    f"--config.model.mixer_kwargs.{k}={v}"
    for k, v in dict(block_cmp=8, stride=4, block_slc=16, num_selected=4, window=32).items()
  ],
  "ahn": ["--config.model.mixer_kwargs.window=32"],
  "sinkhorn": ["--config.train.num_steps=500"],
}
# issue #17's families next to attention (the default --mixers)
SSM_MIXERS = (
  "attention,s4d,dss,mamba,h3,hyena,base_conv,rwkv4,rwkv7,lightweight_conv,dynamic_conv,smlp"
)


def command(mixer: str, workdir: pathlib.Path, args) -> list[str]:
  if args.tiny:
    knobs = "d_model=32,seq_len=32,num_kv_pairs=4,train_examples=256,batch_size=32"
    extra = ["--config.data.vocab_size=128", "--config.data.test_segments=((32,4,64,32),)"]
  else:
    knobs = f"d_model=128,seq_len=256,num_kv_pairs=16,lr={args.lr}"
    extra = []
  spec = f"{REPO}/configs/mqar.py:mixer={mixer},{knobs},num_steps={args.steps},seed={args.seed}"
  every = max(1, args.steps // 8)
  return [
    sys.executable,
    "-m",
    "attnzoo",
    "train",
    "--config",
    spec,
    "--workdir",
    str(workdir),
    "--quiet",
    f"--config.train.eval_every={every}",
    f"--config.train.log_every={every}",
    f"--config.train.checkpoint_every={every * 8}",
    *extra,
    *OVERRIDES.get(mixer, []),
  ]


def result(mixer: str, workdir: pathlib.Path, returncode: int | None, seconds: float) -> dict:
  """summary.json when the run finished; else its last evaluation from metrics.jsonl."""
  row = {"mixer": mixer, "wall_s": round(seconds, 1), "returncode": returncode}
  summary = workdir / "summary.json"
  if summary.exists():
    s = json.loads(summary.read_text())
    return {
      **row,
      "status": s["status"],
      "accuracy": s["eval/accuracy"],
      "step": s["step"],
      "state_size": s["state_size"],
      "params": s["params"],
    }
  evals = []
  if (workdir / "metrics.jsonl").exists():
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
      record = json.loads(line)
      if "eval/accuracy" in record:
        evals.append(record)
  config = workdir / "config.json"
  status = "stopped by its time cap" if returncode in (-9, 124, 137) else f"failed ({returncode})"
  row = {**row, "status": status}
  if evals:
    row.update(accuracy=evals[-1]["eval/accuracy"], step=evals[-1]["step"])
  if config.exists():
    row["config"] = str(config)
  return row


def state_size_of(mixer: str, workdir: pathlib.Path) -> int | None:
  """Bytes of the decoding state summed over the layers at the longest sequence, from the run's
  config.json (written once its experiment is built), as the trainer's summary counts them;
  None without one."""
  from attnzoo.mixers import build_mixer

  path = workdir / "config.json"
  if not path.exists():
    return None
  config = json.loads(path.read_text())
  model, data = config["model"], config["data"]
  seq_len = max(s[0] for s in data["train_segments"] + data["test_segments"])
  total = 0
  for i in range(model["num_layers"]):
    kwargs = dict(model["mixer_kwargs"], layer_idx=i, num_layers=model["num_layers"])
    total += build_mixer(mixer, d_model=model["d_model"], **kwargs).state_size(seq_len)
  return total


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--name", default="mqar_ssm", help="the table's file name")
  p.add_argument("--out", type=pathlib.Path, help="default: experiments/results/<name>")
  p.add_argument("--mixers", default=SSM_MIXERS)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lanes", type=int, default=6, help="runs at once on the device")
  p.add_argument("--run-cap", type=float, default=150.0, help="wall-clock seconds per run")
  p.add_argument("--total-cap", type=float, default=330.0, help="wall-clock seconds in all")
  p.add_argument("--tiny", action="store_true")
  args = p.parse_args(argv)
  mixers = args.mixers.split(",")
  from attnzoo.mixers.registry import causal_mixers

  unknown = sorted(set(mixers) - set(causal_mixers()))
  if unknown:
    raise SystemExit(f"error: not a causal mixer: {', '.join(unknown)}")
  args.out = args.out or REPO / "experiments" / "results" / args.name
  args.out.mkdir(parents=True, exist_ok=True)
  runs = args.out / "runs"
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.lanes:.3f}")
  env["PYTHONPATH"] = f"{REPO}" + (f":{env['PYTHONPATH']}" if env.get("PYTHONPATH") else "")
  start = time.time()
  queue, running, rows = list(mixers), {}, []
  while queue or running:
    while queue and len(running) < args.lanes:
      mixer = queue.pop(0)
      workdir = runs / mixer
      subprocess.run(["rm", "-rf", str(workdir)], check=True)
      log = open(args.out / f"{mixer}.log", "w")
      cap = max(1.0, min(args.run_cap, args.total_cap - (time.time() - start)))
      proc = subprocess.Popen(
        ["timeout", "-s", "KILL", str(int(cap)), *command(mixer, workdir, args)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
      )
      running[mixer] = (proc, time.time(), workdir)
    time.sleep(1.0)
    for mixer, (proc, t0, workdir) in list(running.items()):
      if proc.poll() is not None:
        rows.append(result(mixer, workdir, proc.returncode, time.time() - t0))
        print(json.dumps(rows[-1]), flush=True)
        del running[mixer]
  for row in rows:
    if "state_size" not in row:
      row["state_size"] = state_size_of(row["mixer"], runs / row["mixer"])
  rows.sort(key=lambda r: mixers.index(r["mixer"]))
  device = subprocess.run(
    [sys.executable, "-c", "import jax; print(jax.devices()[0].device_kind)"],
    capture_output=True,
    text=True,
    env=env,
  ).stdout.strip()
  setting = (
    "tiny CPU smoke setting (numbers mean nothing)"
    if args.tiny
    else f"L=256, kv=16, d_model=128, 2 layers, lr={args.lr}, batch 64, <= {args.steps} steps "
    f"(early stop at 0.99), seed {args.seed}"
  )
  lines = [
    f"# MQAR: {', '.join(mixers)}",
    "",
    f"Device: {device}. Setting: {setting}; configs/mqar.py, "
    f"`python experiments/mqar_table.py --name {args.name}`.",
    f"{args.lanes} runs at once on the device, each capped at {args.run_cap:.0f} s "
    f"(all at {args.total_cap:.0f} s); one learning rate, not Zoology's sweep.",
    "state size: bytes of the decoding state summed over the 2 layers, float32, at L=256.",
    "",
    "| mixer | eval accuracy | state size (B) | params | steps | wall (s) | status |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
    params = f"{r['params']:,}" if "params" in r else "-"
    state = f"{r['state_size']:,}" if r.get("state_size") else "-"
    lines.append(
      f"| {r['mixer']} | {acc} | {state} | {params} | {r.get('step', '-')} | "
      f"{r['wall_s']} | {r['status']} |"
    )
  (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
  (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=2))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
