"""Tasks: data generators with their loss and metrics."""
