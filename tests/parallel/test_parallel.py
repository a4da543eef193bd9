"""Scale-out tests on 8 forced CPU devices. XLA reads the device count when the backend
starts, and this pytest process already runs on one device, so each group runs in its own
pytest subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (as the 4-device test
of tests/train does): eight_devices.py (context parallelism: every family x strategy against
one device, collectives, memory) and eight_devices_train.py (the trainer on a mesh)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("group", ["eight_devices.py", "eight_devices_train.py"])
def test_on_eight_devices(group):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  file = REPO / "tests" / "parallel" / group
  command = [sys.executable, "-m", "pytest", "-q", "-x", "-rs", "-p", "no:cacheprovider"]
  result = subprocess.run(
    [*command, "-p", "no:xdist", str(file)], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert "needs 8 (forced) devices" not in result.stdout, result.stdout[-2000:]
