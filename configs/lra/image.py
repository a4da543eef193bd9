"""LRA Image: `attnzoo data prepare lra/image --out DIR --config.data.source=PATH`, then
`attnzoo train --config configs/lra/image.py:mixer=attention,data_dir=DIR --workdir W`.

Knobs as configs/lra/listops.py, with source (the original files; see attnzoo/tasks/lra/files.py)
in place of the generator's options. See attnzoo/tasks/lra/settings.py.
"""

from attnzoo.tasks.lra.settings import lra_config


def get_config(arg=None):
  return lra_config("image", arg)
