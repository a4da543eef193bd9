"""The long BaseConv, RWKV-4 against a numpy loop, packed segments. Shapes, causality, state
sizes and decode ≡ forward (for S4D/DSS/H3: the recurrence, token by token, ≡ the
convolution form) are tests/mixers/test_mixers.py's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers import build_mixer
from tests.conftest import relative_error
from tests.ops.test_wkv4 import numpy_wkv

D, B, T = 16, 2, 13


def x_input(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D))


def test_long_base_conv():
  """kernel_size -1 (or layer_kernel_sizes (3, -1) at layer 1) is the FFT long conv: it sees
  the whole past."""
  x = x_input(1)
  mixer = build_mixer("base_conv", d_model=D, layer_kernel_sizes=(3, -1), layer_idx=1, l_max=T)
  params = mixer.init(jax.random.key(0), x)
  assert "filter" in params["params"] and mixer.state_size(T) == T * D * 4
  grad = jax.jit(jax.grad(lambda x: mixer.apply(params, x)[:, T - 1].sum()))(x)
  assert (np.abs(np.asarray(grad)).sum(axis=(0, 2)) > 0).all()
  short = build_mixer("base_conv", d_model=D, layer_kernel_sizes=(3, -1), layer_idx=0)
  assert short.state_size(T) == 2 * D * 4
  with pytest.raises(ValueError, match="exceeds l_max"):
    build_mixer("base_conv", d_model=D, kernel_size=-1, l_max=8).init(jax.random.key(0), x)


def test_rwkv4_equals_numpy():
  x = x_input(2)
  mixer = build_mixer("rwkv4", d_model=D, layer_idx=1, num_layers=3)
  params = mixer.init(jax.random.key(0), x)["params"]
  P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xs = np.asarray(x, np.float64)
  xx = np.pad(xs, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  mix = lambda mu: xs * mu + xx * (1 - mu)
  k = mix(P["mu_k"]) @ P["key"]["kernel"]
  v = mix(P["mu_v"]) @ P["value"]["kernel"]
  r = mix(P["mu_r"]) @ P["receptance"]["kernel"]
  wkv = numpy_wkv(k, v, np.exp(P["time_decay"]), P["time_first"])
  ref = (wkv / (1 + np.exp(-r))) @ P["output"]["kernel"]
  assert relative_error(mixer.apply({"params": params}, x), ref) < 1e-5
  # RWKV-4's schedules at layer 1 of 3
  np.testing.assert_allclose(P["time_first"][:3], np.log(0.3) + np.array([0, 0.5, -0.5]))
  assert P["time_decay"][0] == -5 and abs(P["time_decay"][-1] - 3) < 1e-5


def test_packed_segments_are_independent():
  x = x_input(3)
  mixer = build_mixer("hyena", d_model=D, l_max=T, filter_order=8)
  params = mixer.init(jax.random.key(0), x)
  apply = jax.jit(mixer.apply)
  seg = jnp.array([[0] * 6 + [1] * 7] * B)
  packed = apply(params, x, segment_ids=seg)
  alone = jnp.concatenate([apply(params, x[:, :6]), apply(params, x[:, 6:])], axis=1)
  assert relative_error(packed, alone) < 1e-5
