"""Long Range Arena (Tay et al. 2021): ListOps and Pathfinder / Path-X from our own generators,
registered as tasks `lra/listops` and `lra/pathfinder` (common.py: splits, shards, the shared
classification task)."""

# Importing the task modules registers them.
from attnzoo.tasks.lra import listops, pathfinder  # noqa: F401
