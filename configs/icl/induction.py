"""Induction heads on repeated random tokens (attnzoo/tasks/induction.py):
`attnzoo train --config configs/icl/induction.py:mixer=attention,num_layers=2`.

Knobs in the argument: mixer, d_model, num_layers, num_heads, state_mixer, vocab_size, span,
min_span, repeats, batch_size, lr, num_steps, seed, dtype, and any option of the mixer by name.
Defaults: Olsson et al.'s probe shape (25 tokens × 4 after BOS) over a 64-token vocabulary for
evaluation, training patterns of span // 3 = 8 to 25 tokens (min_span sets the shortest;
min_span=0: always the span, and then one layer solves the repeats by position), attention-only
models (no MLP) as in their small-model experiments.
"""

import ml_collections

from attnzoo.config import COMMON_KNOBS, apply_knobs, model_section, parse_arg, train_section

KNOBS = {
  **COMMON_KNOBS,
  "vocab_size": "data.vocab_size",
  "span": "data.span",
  "min_span": "data.min_span",
  "repeats": "data.repeats",
  "batch_size": "data.batch_size",
}


def get_config(arg=None):
  knobs = parse_arg(arg)
  mixer = str(knobs.pop("mixer", "attention"))
  c = ml_collections.ConfigDict()
  c.task = "induction"
  c.seed = 0
  c.data = ml_collections.ConfigDict(
    dict(vocab_size=64, span=25, min_span=None, repeats=4, batch_size=64, eval_examples=256)
  )
  c.model = model_section(mixer)
  if "num_heads" in c.model.mixer_kwargs:
    c.model.mixer_kwargs.num_heads = 4
  c.train = train_section()
  apply_knobs(c, knobs, KNOBS, mixer, "configs/icl/induction.py")
  return c
