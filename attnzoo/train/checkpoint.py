"""Orbax checkpoints of the train state. Orbax writes each step to a temporary directory and
renames it when complete, so a half-written checkpoint is never restored."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  def __init__(self, directory: pathlib.Path, max_to_keep: int):
    self.manager = ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, abstract_state, step: int | None = None):
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
