"""Long Range Arena (Tay et al. 2021): ListOps and Pathfinder / Path-X from our own generators
(`lra/listops`, `lra/pathfinder`), Text, Image and Retrieval from local files in their original
formats (`lra/text`, `lra/image`, `lra/retrieval`, files.py); common.py: splits, shards, the
shared classification task; settings.py: the experiment settings of configs/lra/."""

# Importing the task modules registers them.
from attnzoo.tasks.lra import files, listops, pathfinder  # noqa: F401
