"""Scale-out tests on 8 forced CPU devices. XLA reads the device count when the backend
starts, and this pytest process already runs on one device, so each group runs in its own
pytest subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (as the 4-device test
of tests/train does): eight_devices.py (context parallelism: every family x strategy against
one device, collectives, memory) and eight_devices_train.py (the trainer on a mesh).
Opt-in: two processes of 4 devices each (jax.distributed, gloo)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import FAST_XLA_FLAGS, REPO, slow


@pytest.mark.parametrize("group", ["eight_devices.py", "eight_devices_train.py"])
def test_on_eight_devices(group):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_XLA_FLAGS}"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  file = REPO / "tests" / "parallel" / group
  command = [sys.executable, "-m", "pytest", "-q", "-x", "-rs", "-p", "no:cacheprovider"]
  result = subprocess.run(
    [*command, "-p", "no:xdist", str(file)], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert "needs 8 (forced) devices" not in result.stdout, result.stdout[-2000:]


@slow
def test_two_processes_match_one_device():
  """jax.distributed over 2 processes x 4 CPU devices (gloo): 2 training steps on a
  (2 data, 2 fsdp, 2 context) mesh spanning both give one device's losses."""
  from attnzoo.train.trainer import Experiment
  from tests.parallel.eight_devices_train import config, run

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = str(REPO / "tests" / "parallel" / "two_processes.py")
  processes = [
    subprocess.Popen(
      [sys.executable, script, str(i), str(port)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )  # fmt: skip
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  losses = json.loads(outputs[0][0].strip().splitlines()[-1])
  _, expected = run(Experiment(config()))
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
