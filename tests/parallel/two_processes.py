"""One of two processes (4 CPU devices each) training the tiny MQAR model of
eight_devices_train.py for 2 steps on a (2 data, 2 fsdp, 2 context) mesh over both, started by
tests/parallel/test_parallel.py: `python two_processes.py PROCESS_ID PORT`. Prints the losses
as JSON (process 0)."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.update(
  ATTNZOO_DISTRIBUTED="1",
  JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{sys.argv[2]}",
  JAX_NUM_PROCESSES="2",
  JAX_PROCESS_ID=sys.argv[1],
)

from attnzoo.config import mesh_section  # noqa: E402
from attnzoo.train import sharding  # noqa: E402

assert sharding.maybe_initialize_distributed(mesh_section())  # before anything starts jax
import jax  # noqa: E402

from attnzoo.train.trainer import Experiment  # noqa: E402
from tests.parallel.eight_devices_train import MESH, config, run  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
_, losses = run(Experiment(config(**MESH)))
if jax.process_index() == 0:
  print(json.dumps(losses))
