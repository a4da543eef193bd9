"""LRA Path-X (Pathfinder at 128 x 128, 16K tokens): `attnzoo train --config
configs/lra/pathx.py:mixer=... --workdir DIR`. Knobs as configs/lra/pathfinder.py.
"""

from attnzoo.tasks.lra.settings import lra_config


def get_config(arg=None):
  return lra_config("pathx", arg)
