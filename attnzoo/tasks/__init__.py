"""Tasks: registered by name, each owning its data, model head, loss and metrics (base.py)."""

# Importing the task modules registers them.
from attnzoo.tasks import icl, induction, lm, lra, mqar  # noqa: F401,E402
from attnzoo.tasks.base import TASKS, Batch, Task, build_task, register_task

__all__ = ["TASKS", "Batch", "Task", "build_task", "register_task"]
