"""LRA ListOps: `attnzoo train --config configs/lra/listops.py:mixer=attention --workdir DIR`.

Knobs: setting (lra: LRA's apples-to-apples sizes and optimiser, the default; s4: an S4-style
deeper, longer run), mixer, d_model, num_layers, num_heads, lr, num_steps, warmup_steps,
batch_size, seed, dtype, data_dir (shards from `attnzoo data prepare lra/listops`; empty:
generated in memory), num_train / num_val / num_test, the generator's options (min_length,
max_length, max_depth, max_args) and any option of the mixer. See attnzoo/tasks/lra/settings.py.
"""

from attnzoo.tasks.lra.settings import lra_config


def get_config(arg=None):
  return lra_config("listops", arg)
