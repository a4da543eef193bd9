"""Metrics to workdir/metrics.jsonl (one flat JSON object per line), TensorBoard event files
(tensorboardX) and a progress bar."""

from __future__ import annotations

import json
import math
import pathlib

import tensorboardX
import tqdm


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
  def __init__(self, workdir: pathlib.Path, total_steps: int, resume_step: int, quiet: bool):
    self.path = workdir / "metrics.jsonl"
    # A resumed run repeats the steps after its checkpoint: drop what the killed run logged.
    kept = [m for m in read_metrics(workdir) if m["step"] <= resume_step]
    self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    self.file = self.path.open("a")
    self.tensorboard = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
    self.progress = tqdm.tqdm(
      total=total_steps, initial=resume_step, disable=quiet, dynamic_ncols=True, desc="train"
    )

  def write(self, step: int, metrics: dict) -> None:
    record = {
      "step": step,
      **{k: (float(v) if not isinstance(v, str) else v) for k, v in metrics.items()},
    }
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, float) and math.isfinite(value):
        self.tensorboard.add_scalar(key, value, step)
    self.tensorboard.flush()
    shown = {
      k.split("/", 1)[1]: f"{v:.4g}"
      for k, v in record.items()
      if k in ("train/loss", "eval/accuracy", "throughput/tokens_per_s")
    }
    if shown:
      self.progress.set_postfix(shown, refresh=False)

  def advance(self, steps: int) -> None:
    self.progress.update(steps)

  def close(self) -> None:
    self.progress.close()
    self.file.close()
    self.tensorboard.close()
