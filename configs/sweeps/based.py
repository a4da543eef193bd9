"""Based (Arora et al. 2024) MQAR sweep, figures 2-3: every model is a [BaseConv(k=3), X]
hybrid of 2 layers, swept over d_model x feature_dim and learning rates (best per setting).

`attnzoo sweep --config configs/sweeps/based.py --workdir DIR`
`attnzoo sweep --config "configs/sweeps/based.py:d_models=64,feature_dims=16,lrs=0.003"`
`attnzoo sweep --config "configs/sweeps/based.py:mixers=base_conv+based+sliding_window,\
window=64,num_layers=3"`

Argument knobs (';'-separated lists): mixers (default base_conv+based, the paper's MQAR
recipe; base_conv+based+sliding_window is the LM layer recipe), d_models (48;64;128),
feature_dims (8;16;24), lrs (logspace(-3, -1.5, 4)); window (the sliding_window width, when
the hybrid has one); any other configs/mqar.py knob passes through (seq_len, num_kv_pairs,
num_layers, num_steps, ...). Without seq_len/num_kv_pairs it trains on configs/mqar.py's mix
of lengths (Zoology's) rather than the Based paper's exact training mix.
"""

import pathlib

import numpy as np

from attnzoo.config import load_config_file, set_typed

MQAR = pathlib.Path(__file__).resolve().parent.parent / "mqar.py"


def get_config(arg=None):
  knobs = dict(item.split("=", 1) for item in filter(None, (arg or "").split(",")))
  mixers = knobs.pop("mixers", "base_conv+based").split(";")
  d_models = [int(d) for d in knobs.pop("d_models", "48;64;128").split(";")]
  feature_dims = [int(f) for f in knobs.pop("feature_dims", "8;16;24").split(";")]
  lrs = [
    float(x)
    for x in knobs.pop("lrs", ";".join(str(v) for v in np.logspace(-3, -1.5, 4))).split(";")
  ]
  window = knobs.pop("window", None)
  rest = ",".join(f"{k}={v}" for k, v in knobs.items())
  configs = []
  for mixer in mixers:
    names = mixer.split("+")
    for d_model in d_models:
      for fd in feature_dims if "based" in names else [None]:
        for lr in lrs:
          c = load_config_file(
            f"{MQAR}:"
            + ",".join(filter(None, [f"mixer={mixer}", f"d_model={d_model}", f"lr={lr}", rest]))
          )
          prefix = "model.mixer_kwargs." + ("based." if len(names) > 1 else "")
          if fd is not None:
            set_typed(c, prefix + "feature_dim", fd)
          if window is not None and "sliding_window" in names:
            set_typed(
              c,
              "model.mixer_kwargs." + ("sliding_window." if len(names) > 1 else "") + "window",
              int(window),
            )
          setting = f"{mixer}_d{d_model}" + (f"_f{fd}" if fd is not None else "")
          c.name = f"{setting}_lr{lr:.2g}"
          c.group = setting
          configs.append(c)
  return configs
