"""In-context learning of a function class (attnzoo/tasks/icl.py):
`attnzoo train --config configs/icl/icl.py:function=linear,dim=10,n_points=21,mixer=attention`.

Knobs in the argument: function (linear, sparse_linear, noisy_linear, relu2nn, dtree,
conjunction, disjunction, majority, parity, sparse_parity, ar), format (interleaved or concat),
dim, n_points, eval_points (e.g. "(21,41)"), curriculum_every (0: off; Garg's curriculum from
dim 5 and 11 points), mixer, d_model, num_layers, num_heads, state_mixer, lr, batch_size,
num_steps, seed, dtype, and any option of the function class (sigma, noise, sparsity, ...) or of
the mixer by name. Defaults: Garg et al.'s small model (3 layers, 2 heads, width 64, an MLP) on
linear regression with d = 10 and 21 points.
"""

import ml_collections

from attnzoo.config import COMMON_KNOBS, apply_knobs, model_section, parse_arg, train_section

KNOBS = {
  **COMMON_KNOBS,
  "function": "data.kind",
  "format": "data.format",
  "dim": "data.dim",
  "n_points": "data.n_points",
  "eval_points": "data.eval_points",
  "batch_size": "data.batch_size",
  "curriculum_every": "data.curriculum.every",
}
FUNCTION_OPTIONS = (
  "x_dist",
  "x_scale",
  "w_scale",
  "sparsity",
  "noise",
  "sigma",
  "sigma_choices",
  "hidden",
  "ar_noise",
)


def get_config(arg=None):
  knobs = parse_arg(arg)
  mixer = str(knobs.pop("mixer", "attention"))
  c = ml_collections.ConfigDict()
  c.task = "icl"
  c.seed = 0
  c.data = ml_collections.ConfigDict(
    dict(
      kind="linear",
      format="interleaved",
      dim=10,
      n_points=21,
      eval_points=(),
      batch_size=64,
      eval_examples=512,
      x_dist="normal",
      x_scale=1.0,
      w_scale=1.0,
      sparsity=3,
      noise="fixed",
      sigma=0.0,
      sigma_choices=(1.0, 3.0),
      hidden=100,
      ar_noise=1.0,
      curriculum=dict(every=0, dims_start=5, dims_inc=1, points_start=11, points_inc=2),
    )
  )
  c.model = model_section(
    mixer, num_layers=3, state_mixer="mlp", max_positions=1024
  )  # learned positions for up to 512 interleaved points
  if "num_heads" in c.model.mixer_kwargs:
    c.model.mixer_kwargs.num_heads = 2
  c.train = train_section(
    num_steps=20_000,
    lr=1e-3,
    warmup_steps=500,
    b2=0.999,
    log_every=100,
    eval_every=1000,
    checkpoint_every=1000,
  )
  apply_knobs(c, knobs, KNOBS, mixer, "configs/icl/icl.py", FUNCTION_OPTIONS)
  return c
