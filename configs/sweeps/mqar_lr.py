"""Learning-rate sweep on MQAR, reported as Zoology does: the best run over learning rates.

`attnzoo sweep --config configs/sweeps/mqar_lr.py:mixers=attention;sliding_window,d_models=64;128`
Argument knobs: mixers and d_models (';'-separated), lrs (';'-separated, default Zoology's
logspace(-4, -2, 4)), and any configs/mqar.py knob, passed through. Each config gets a `name`
(its workdir) and a `group` (the setting the best learning rate is picked for).
"""

import pathlib

import numpy as np

from attnzoo.config import load_config_file

MQAR = pathlib.Path(__file__).resolve().parent.parent / "mqar.py"


def get_config(arg=None):
  knobs = dict(item.split("=", 1) for item in filter(None, (arg or "").split(",")))
  mixers = knobs.pop("mixers", "attention").split(";")
  d_models = [int(d) for d in knobs.pop("d_models", "64").split(";")]
  lrs = [
    float(x) for x in knobs.pop("lrs", ";".join(str(v) for v in np.logspace(-4, -2, 4))).split(";")
  ]
  rest = ",".join(f"{k}={v}" for k, v in knobs.items())
  configs = []
  for mixer in mixers:
    for d_model in d_models:
      for lr in lrs:
        c = load_config_file(
          f"{MQAR}:"
          + ",".join(filter(None, [f"mixer={mixer}", f"d_model={d_model}", f"lr={lr}", rest]))
        )
        c.name = f"{mixer}_d{d_model}_lr{lr:.2g}"
        c.group = f"{mixer}_d{d_model}"
        configs.append(c)
  return configs
