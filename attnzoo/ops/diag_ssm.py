"""Diagonal state-space model (S4D, Gu et al. 2022; DSS, Gupta et al. 2022, seed #94) over
channels c with N complex modes each (the conjugate half is implied: the output takes 2 Re):

  x_t = dA ⊙ x_{t-1} + u_t            (x_t [N] complex per channel; B̄ is folded into W)
  y_t = 2 Re(W · x_t)                 (W = C ⊙ B̄, the output weights)

so y = K * u with the closed-form (Vandermonde) kernel K_l = 2 Re Σ_n W_n dA_n^l.

Layout: u [B,T,C]; log_dA and W [G,N] complex for G groups of channels, channel c using group
c // (C / G) (H3 shares one SSM across the d_h^2 channels of a head). `discretize` gives
log dA and B̄ from continuous (dt, A) by ZOH or bilinear. The decoding state is x as float32
pairs (re, im): [B,C,N,2].

Forms: `reference` / "xla" (the convolution form: `kernel`, then attnzoo.ops.long_conv, plus
the closed-form contribution of an initial state, and the final state as a Vandermonde sum),
`recurrent` (lax.scan of `step`). `segment_ids` [B,T] reset the state at segment starts;
`initial_state` feeds the first segment only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnzoo.ops import long_conv as lc_ops
from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.segments import segment_starts

F32 = jnp.float32

dispatcher = Dispatcher("diag_ssm", auto_order={"default": ("xla", "recurrent")})
DISCRETIZATIONS = ("zoh", "bilinear")


def discretize(dt: jax.Array, a: jax.Array, method: str = "zoh") -> tuple[jax.Array, jax.Array]:
  """(log dA, B̄) for x' = A x + 1·u with step dt [G] and A [G,N] complex (Re A < 0).
  zoh: dA = exp(dt A), B̄ = (dA - 1) / A; bilinear: dA = (1 + dt A/2) / (1 - dt A/2),
  B̄ = dt / (1 - dt A/2)."""
  dta = dt.astype(F32)[:, None] * a
  if method == "zoh":
    return dta, jnp.expm1(dta) / a
  if method == "bilinear":
    return jnp.log1p(dta / 2) - jnp.log1p(-dta / 2), dt.astype(F32)[:, None] / (1 - dta / 2)
  raise ValueError(f"unknown discretization {method!r}; use one of {', '.join(DISCRETIZATIONS)}")


def kernel(log_da: jax.Array, w: jax.Array, length: int) -> jax.Array:
  """K [L,G] float32: K_l = 2 Re Σ_n W_n exp(l log dA_n) (a Vandermonde product)."""
  powers = jnp.exp(jnp.arange(length, dtype=F32)[:, None, None] * log_da[None])  # [L,G,N]
  return 2 * jnp.real(jnp.einsum("lgn,gn->lg", powers, w))


def _canonical(u, log_da, w, initial_state, segment_ids):
  if u.ndim != 3 or log_da.ndim != 2 or w.shape != log_da.shape:
    raise ValueError(
      f"diag_ssm wants u [B,T,C], log_dA and W [G,N]; got {u.shape}, {log_da.shape}, {w.shape}"
    )
  b, t, c = u.shape
  g, n = log_da.shape
  if c % g:
    raise ValueError(f"diag_ssm: the groups ({g}) must divide the channels ({c})")
  if initial_state is not None and initial_state.shape != (b, c, n, 2):
    raise ValueError(f"diag_ssm: initial_state must be [B,C,N,2]={(b, c, n, 2)}")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"diag_ssm: segment_ids must be [B,T]={(b, t)}; got {segment_ids.shape}")


def _per_channel(p: jax.Array, channels: int) -> jax.Array:
  return jnp.repeat(p, channels // p.shape[0], axis=0)


def _complex(state: jax.Array) -> jax.Array:
  return lax.complex(state[..., 0], state[..., 1])


def _real(x: jax.Array) -> jax.Array:
  return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1).astype(F32)


def init_state(batch: int, channels: int, modes: int) -> jax.Array:
  """Zero state [B,C,N,2] (re, im) float32."""
  return jnp.zeros((batch, channels, modes, 2), F32)


def reference(
  u: jax.Array,
  log_da: jax.Array,
  w: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  conv_implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The convolution form (module docstring); float32 inside, returns u's dtype."""
  _canonical(u, log_da, w, initial_state, segment_ids)
  b, t, c = u.shape
  r = c // log_da.shape[0]
  k = jnp.repeat(kernel(log_da, w, t), r, axis=1)  # [T,C]
  y = lc_ops.long_conv(
    u.astype(F32), k, segment_ids=segment_ids, implementation=conv_implementation
  )
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  la, wc = _per_channel(log_da, c), _per_channel(w, c)  # [C,N]
  steps = jnp.arange(t, dtype=F32)
  if initial_state is not None:  # y_t += 2 Re Σ_n W_n dA_n^(t+1) x0_n, first segment only
    x0 = _complex(initial_state.astype(F32))
    decay = jnp.exp((steps + 1)[:, None, None] * la[None])  # [T,C,N]
    y0 = 2 * jnp.real(jnp.einsum("tcn,bcn,cn->btc", decay, x0, wc))
    y = y + jnp.where((seg == seg[:, :1])[..., None], y0, 0.0)
  y = y.astype(u.dtype)
  if not return_final_state:
    return y
  # x_{T-1} = Σ_{s in the last segment} dA^(T-1-s) u_s (+ dA^T x0 when one segment)
  last = (seg == seg[:, -1:]).astype(F32)  # [B,T]
  powers = jnp.exp((t - 1 - steps)[:, None, None] * la[None])  # [T,C,N]
  final = jnp.einsum("tcn,btc->bcn", powers, u.astype(F32) * last[..., None])
  if initial_state is not None:
    one = (seg[:, 0] == seg[:, -1])[:, None, None]
    final = final + jnp.where(one, jnp.exp(t * la)[None] * _complex(initial_state), 0.0)
  return y, _real(final)


def step(
  state: jax.Array,
  u: jax.Array,
  log_da: jax.Array,
  w: jax.Array,
  *,
  reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One token: state [B,C,N,2], u [B,C]; reset [B] zeroes the state first. Returns (state
  float32, y [B,C] in u's dtype)."""
  c = u.shape[-1]
  x = _complex(state.astype(F32))
  if reset is not None:
    x = jnp.where(reset[:, None, None], 0.0, x)
  x = jnp.exp(_per_channel(log_da, c))[None] * x + u.astype(F32)[..., None]
  y = 2 * jnp.real(jnp.einsum("bcn,cn->bc", x, _per_channel(w, c)))
  return _real(x), y.astype(u.dtype)


def recurrent(
  u: jax.Array,
  log_da: jax.Array,
  w: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """lax.scan of `step` over time."""
  _canonical(u, log_da, w, initial_state, segment_ids)
  b, t, c = u.shape
  s0 = init_state(b, c, log_da.shape[1]) if initial_state is None else initial_state
  reset = jnp.zeros((b, t), bool) if segment_ids is None else segment_starts(segment_ids)

  def body(state, inp):
    return step(state, inp[0], log_da, w, reset=inp[1])

  final, y = lax.scan(body, s0.astype(F32), (u.swapaxes(0, 1), reset.swapaxes(0, 1)))
  y = y.swapaxes(0, 1)
  return (y, final) if return_final_state else y


def _xla_supports(u, segment_ids, **_):
  if segment_ids is not None and u.shape[1] > lc_ops.DIRECT_MAX_LENGTH:
    return "packed segments beyond 64 tokens (their direct convolution is O(T^2) memory)"
  return None


@dispatcher.register("xla", supports=_xla_supports)
def _xla(**kwargs):
  return reference(**kwargs)


@dispatcher.register("recurrent")
def _recurrent(**kwargs):
  return recurrent(**kwargs)


def diag_ssm(
  u: jax.Array,
  log_da: jax.Array,
  w: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """y [B,T,C] (or (y, final_state [B,C,N,2])). implementation: "auto" | "xla" |
  "recurrent"; "auto" takes the recurrence for packed segments beyond 64 tokens."""
  _canonical(u, log_da, w, initial_state, segment_ids)
  return dispatcher(
    implementation,
    u=u,
    log_da=log_da,
    w=w,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
  )


S4D_INITS = ("lin", "inv", "legs")


def legs_eigenvalues(state: int) -> np.ndarray:
  """The N/2 eigenvalues (positive imaginary part, ascending) of the normal part of HiPPO-LegS,
  -1/2 + i·eig(S) with S skew-symmetric, S_nk = -sqrt((2n+1)(2k+1))/2 for n > k (DSS's init;
  S4D-LegS)."""
  n = np.arange(state)
  s = np.sqrt((2 * n[:, None] + 1) * (2 * n[None, :] + 1)) / 2
  s = np.where(n[:, None] > n[None, :], -s, np.where(n[:, None] < n[None, :], s, 0.0))
  imag = np.sort(np.linalg.eigvals(s).imag)
  return -0.5 + 1j * imag[imag > 0][: state // 2]


def s4d_eigenvalues(state: int, init: str) -> np.ndarray:
  """A [N/2] complex for a state of N: S4D-Lin -1/2 + iπn, S4D-Inv -1/2 + i(N/π)(N/(2n+1) - 1)
  (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space
  Models"), or LegS (`legs_eigenvalues`)."""
  n = np.arange(state // 2)
  if init == "lin":
    return -0.5 + 1j * np.pi * n
  if init == "inv":
    return -0.5 + 1j * (state / np.pi) * (state / (2 * n + 1) - 1)
  if init == "legs":
    return legs_eigenvalues(state)
  raise ValueError(f"unknown S4D init {init!r}; use one of {', '.join(S4D_INITS)}")
