"""The bidirectional (non-causal) form of the linear-attention / decay families: forward +
reverse scans weigh every pair (t, s) once, checked against a quadratic reference written from
the definition; reversing the input reverses the output where the weights are symmetric; the
padding segment stays out of the real tokens' context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers import build_mixer
from attnzoo.mixers.layers import LinearAttentionOp, reversed_pass
from tests.conftest import relative_error, slow

B, T, H, K, V = 2, 13, 3, 4, 5


def reference(q, k, v, log_decay, bonus, segment_ids, scale, normalize, eps=1e-6):
  """o_t = sum_s w_ts v_s, w_ts = scale q_t . (decay between t and s) k_s over all s."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  g = np.zeros((B, T, H, K))
  if log_decay is not None:
    ld = np.asarray(log_decay, np.float64)
    g = g + (ld[None, None, :, None] if ld.ndim == 1 else ld if ld.ndim == 4 else ld[..., None])
  c = np.cumsum(g, axis=1)  # [B,T,H,K]
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  ct, cs = c[:, :, None], c[:, None, :]  # [B,t,s,H,K]
  gt, gs = g[:, :, None], g[:, None, :]
  if bonus is None:  # s <= t: decays in (s, t]; s > t: in [t, s)
    expo = np.where((s <= t)[..., None, None], ct - cs, (cs - gs) - (ct - gt))
  else:  # RWKV readout: decays strictly between t and s, the bonus on the diagonal
    expo = np.where((s < t)[..., None, None], ct - gt - cs, cs - gs - ct)
  factor = np.exp(expo)
  if bonus is not None:
    eye = (s == t)[None, :, :, None, None]
    factor = np.where(eye, np.asarray(bonus, np.float64)[None, None, None], factor)
  w = scale * np.einsum("bthk,bshk,btshk->bhts", q, k, factor)
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    w = w * (seg[:, None, :, None] == seg[:, None, None, :])
  o = np.einsum("bhts,bshv->bthv", w, v)
  if normalize:
    o = o / (np.einsum("bhts->bth", w)[..., None] + eps)
  return o


CASES = {
  "plain_normalized": dict(decay=None, bonus=False, normalize=True),
  "fixed_decay": dict(decay="H", bonus=False, normalize=False),
  "scalar_decay_segments": dict(decay="BTH", bonus=False, normalize=False, segments=True),
  "channel_decay_bonus": dict(decay="BTHK", bonus=True, normalize=False),
}
SLOW_CASES = {  # opt-in (ATTNZOO_SLOW_TESTS=1)
  "channel_decay": dict(decay="BTHK", bonus=False, normalize=False),
}


@pytest.mark.parametrize("case", [*CASES, *(pytest.param(c, marks=slow) for c in SLOW_CASES)])
def test_both_scans_weigh_every_pair_once(case):
  spec = {**CASES, **SLOW_CASES}[case]
  keys = jax.random.split(jax.random.key(0), 6)
  q, k = (jax.random.normal(keys[i], (B, T, H, K)) for i in (0, 1))
  if spec["normalize"]:
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
  v = jax.random.normal(keys[2], (B, T, H, V))
  shape = {"H": (H,), "BTH": (B, T, H), "BTHK": (B, T, H, K)}.get(spec["decay"])
  log_decay = None if shape is None else -jax.nn.softplus(jax.random.normal(keys[3], shape))
  bonus = jax.random.normal(keys[4], (H, K)) if spec["bonus"] else None
  segments = jnp.asarray(np.repeat([[0, 1]], T, 0).T.reshape(B, T) * 0 + (np.arange(T) >= 7))
  segments = segments if spec.get("segments") else None
  op = LinearAttentionOp(scale=0.5, normalize=spec["normalize"], causal=False, implementation="xla")
  out = op.apply({}, q, k, v, log_decay, bonus, segment_ids=segments)
  ref = reference(q, k, v, log_decay, bonus, segments, 0.5, spec["normalize"])
  assert relative_error(out, ref) < 1e-5
  if case == "channel_decay_bonus":  # the hidden attention of both scans, once
    matrix = op.apply({}, q, k, log_decay, bonus, method="attention_matrix")
    assert relative_error(jnp.einsum("bhts,bshv->bthv", matrix, v), ref) < 1e-5


@pytest.mark.parametrize(
  "name,kwargs",
  [
    pytest.param(
      "linear_attention", dict(num_heads=2, feature_dim=4, implementation="xla"), marks=slow
    ),
    pytest.param("retnet", dict(num_heads=2, rope=False, implementation="xla"), marks=slow),
    ("mamba2", dict(d_state=8, head_dim=8, ngroups=2, implementation="xla")),
  ],
)
def test_symmetric_weights_reverse_with_the_input(name, kwargs):
  """Without positions or data-dependent decays the two scans are mirror images, and Mamba-2's
  reverse pass is its forward pass on the reversed input: reversing the input reverses the
  output (a causal form could not)."""
  mixer = build_mixer(name, d_model=16, causal=False, **kwargs)
  x = jax.random.normal(jax.random.key(1), (B, T, 16))
  params = mixer.init(jax.random.key(2), x)
  out = mixer.apply(params, x)
  flipped = mixer.apply(params, jnp.flip(x, 1))
  assert relative_error(jnp.flip(flipped, 1), out) < 1e-5
  causal = build_mixer(name, d_model=16, causal=True, **kwargs)
  assert relative_error(causal.apply(params, x), out) > 1e-2


@slow  # the op's segments are checked against the reference in scalar_decay_segments
def test_padding_segment_stays_out_of_real_tokens():
  mixer = build_mixer("gla", d_model=16, causal=False, num_heads=2, implementation="xla")
  x = jax.random.normal(jax.random.key(3), (B, T, 16))
  mask = jnp.arange(T)[None] < jnp.array([[9], [T]])
  params = mixer.init(jax.random.key(4), x)
  out = mixer.apply(params, x, segment_ids=mask.astype(jnp.int32))
  noisy = jnp.where(mask[..., None], x, 5.0)
  out2 = mixer.apply(params, noisy, segment_ids=mask.astype(jnp.int32))
  np.testing.assert_allclose(np.asarray(out)[mask], np.asarray(out2)[mask], rtol=1e-5, atol=1e-6)


def test_reversed_pass_sees_the_future_of_its_segment():
  """With a running sum as the causal pass: out[t] = sum of u[s] for s >= t (s > t with
  strictly_future) in t's segment."""
  u = jax.random.normal(jax.random.key(5), (2, 9, 3))
  seg = jnp.array([[0, 0, 0, 0, 1, 1, 1, 2, 2], [0] * 9])

  def running_sum(x, s):  # causal, restarting at each segment
    same = (s[:, :, None] == s[:, None, :]) & (jnp.arange(9)[:, None] >= jnp.arange(9)[None])
    return jnp.einsum("bts,bsc->btc", same.astype(x.dtype), x)

  s_np, u_np = np.asarray(seg), np.asarray(u)
  for strict in (False, True):
    out = reversed_pass(running_sum, u, seg, strictly_future=strict)
    want = np.zeros_like(u_np)
    for b, t in np.ndindex(2, 9):
      later = [s for s in range(t + strict, 9) if s_np[b, s] == s_np[b, t]]
      want[b, t] = u_np[b, later].sum(0)
    assert relative_error(out, want) < 1e-6


@pytest.mark.parametrize(
  "name,kwargs",
  [
    ("s4d", dict(d_state=8)),
    ("mamba", dict(d_state=4, implementation="scan")),
  ],
)
def test_ssm_encoders_see_the_future_within_their_segment(name, kwargs):
  """S4D (S4's bidirectional kernel; DSS shares its layer) and Mamba (Vision Mamba's reverse
  scan): the output at t depends on later inputs of its segment, never on another segment's."""
  mixer = build_mixer(name, d_model=8, causal=False, **kwargs)
  x = jax.random.normal(jax.random.key(6), (1, 10, 8))
  seg = jnp.array([[0] * 6 + [1] * 4])
  params = jax.jit(mixer.init)(jax.random.key(7), x)
  grad = jax.jit(jax.grad(lambda x: mixer.apply(params, x, segment_ids=seg)[0, 2].sum()))(x)[0]
  norms = np.asarray(jnp.linalg.norm(grad, axis=-1))
  assert (norms[3:6] > 1e-6).all() and (norms[6:] == 0).all()
  with pytest.raises(ValueError, match="does not decode"):
    mixer.apply(params, x[:, :1], decode=True, mutable=["cache"])
