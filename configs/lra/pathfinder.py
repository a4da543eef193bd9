"""LRA Pathfinder-32: `attnzoo train --config configs/lra/pathfinder.py:mixer=attention ...`.

Knobs as configs/lra/listops.py, with the generator's options resolution (32) and difficulty
(easy | intermediate | hard, LRA: hard). See attnzoo/tasks/lra/settings.py.
"""

from attnzoo.tasks.lra.settings import lra_config


def get_config(arg=None):
  return lra_config("pathfinder", arg)
