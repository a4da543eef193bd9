"""In-context learning of function classes (Garg et al. 2022; seeds #17 He et al. 2025, #46
Vladymyrov et al. 2024, #48 in-context forecasting, #110 Bhattamishra et al. 2024).

Every sequence draws its own function f from a class and N inputs x_i; the model reads the
prompt and predicts f(x_i) from the earlier pairs only. Sampling is pure JAX, keyed on
(seed, step): `sample(key, spec, batch, n_points, dim)` -> {xs [B,N,d], ys [B,N], clean [B,N],
sigma [B]}.

Classes (`FUNCTION_CLASSES`):
  linear         w ~ N(0, w_scale² I), y = wᵀx (Garg: w_scale 1; He et al.: 1/sqrt(d)).
  sparse_linear  linear with `sparsity` non-zero coordinates of w.
  noisy_linear   y = wᵀx + σ_τ ε with σ_τ fixed per sequence: `noise` = "fixed" (σ = sigma),
                 "uniform" (U(0, sigma)) or "categorical" (uniform over `sigma_choices`). The
                 target of the query in the concat format is noiseless (Vladymyrov et al.).
  relu2nn        Σ_{i≤hidden} a_i relu(w_iᵀx), a_i ~ N(0, 2/hidden), w_i ~ N(0, I).
  dtree          depth-4 tree; node coordinate uniform, right if x_c > 0; leaves ~ N(0, 1).
  conjunction, disjunction, majority, parity, sparse_parity
                 Boolean x ∈ {±1}^d, y ∈ {±1} (Bhattamishra et al.): each literal is positive
                 with p = 0.15 and negated with p = 0.15; an example is forced to satisfy the
                 conjunction with p = 0.3. For disjunctions (our choice, to keep the labels
                 balanced) an example is forced to falsify it with p = 0.3. Majority and parity
                 take a uniform random subset (each coordinate with p = 0.5); sparse parity
                 takes `sparsity` coordinates.
  ar             AR(p) series z_t = Σ_j a_j z_{t-j} + ar_noise·ε (p = dim), a_j ~ U(-1, 1)
                 rescaled to Σ|a_j| ≤ 0.95 (stationary); x_t = (z_{t-1}, …, z_{t-p}),
                 y_t = z_t, after a burn-in of 4p steps (in-context forecasting). The error
                 scale is 1, so the innovation variance ar_noise² is its floor.

Prompt formats (`FORMATS`):
  interleaved  x_1, y_1, x_2, y_2, … as 2N tokens of width d, y written as (y, 0, …, 0) (Garg);
               the prediction of y_i is read at x_i's position; the loss averages over all i.
  concat       (x_i, y_i) for i < N, then (x_N, 0): N tokens of width d + 1 (von Oswald et al.,
               He et al.); the prediction is read at the query only.

The optional curriculum (Garg) grows the active dimension (unused coordinates are zero) and the
number of points every `curriculum_every` steps. The error is the squared error divided by the
variance of y under the prior (`error_scale`: d, s for sparse, 1 for trees, AR and Boolean), so
the zero predictor scores ≈ 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnzoo.tasks.base import Batch, Task, register_task

BOOLEAN = ("conjunction", "disjunction", "majority", "parity", "sparse_parity")
FUNCTION_CLASSES = (
  "linear",
  "sparse_linear",
  "noisy_linear",
  "relu2nn",
  "dtree",
  *BOOLEAN,
  "ar",
)
FORMATS = ("interleaved", "concat")
NOISE_MODES = ("fixed", "uniform", "categorical")
TREE_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class FunctionSpec:
  """What to sample: the class and its options (hashable, so samplers are cached per spec)."""

  kind: str = "linear"
  x_dist: str = "normal"  # "normal" N(0, I) or "uniform" U(-x_scale, x_scale)
  x_scale: float = 1.0
  w_scale: float = 1.0
  sparsity: int = 3
  noise: str = "fixed"
  sigma: float = 0.0
  sigma_choices: tuple[float, ...] = (1.0, 3.0)
  hidden: int = 100
  ar_noise: float = 1.0

  def check(self, dim: int) -> None:
    if self.kind not in FUNCTION_CLASSES:
      raise ValueError(f"unknown function class {self.kind!r}; use {', '.join(FUNCTION_CLASSES)}")
    if self.x_dist not in ("normal", "uniform"):
      raise ValueError(f"x_dist must be normal or uniform, got {self.x_dist!r}")
    if self.noise not in NOISE_MODES:
      raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)}, got {self.noise!r}")
    if self.kind in ("sparse_linear", "sparse_parity") and not 1 <= self.sparsity <= dim:
      raise ValueError(f"sparsity must be in [1, dim={dim}], got {self.sparsity}")
    if self.sigma < 0 or any(s < 0 for s in self.sigma_choices) or self.hidden < 1:
      raise ValueError("sigma, sigma_choices must be >= 0 and hidden >= 1")


def error_scale(spec: FunctionSpec, dim: int) -> float:
  """Var(y) under the prior for unit-variance inputs: the error's normaliser."""
  if spec.kind in ("linear", "noisy_linear", "relu2nn"):
    return dim * (spec.w_scale**2 if spec.kind != "relu2nn" else 1.0)
  if spec.kind == "sparse_linear":
    return spec.sparsity * spec.w_scale**2
  return 1.0


def _inputs(key, spec: FunctionSpec, shape):
  if spec.kind in BOOLEAN:
    return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0)
  if spec.x_dist == "uniform":
    return jax.random.uniform(key, shape, minval=-spec.x_scale, maxval=spec.x_scale)
  return spec.x_scale * jax.random.normal(key, shape)


def _sigma(key, spec: FunctionSpec, batch: int):
  if spec.kind != "noisy_linear":
    return jnp.zeros((batch,))
  if spec.noise == "fixed":
    return jnp.full((batch,), spec.sigma)
  if spec.noise == "uniform":
    return jax.random.uniform(key, (batch,), maxval=spec.sigma)
  return jax.random.choice(key, jnp.asarray(spec.sigma_choices), (batch,))


def _tree(key, xs, active):
  """Depth-4 decision trees, one per sequence: xs [B,N,d] -> [B,N]."""
  b, _, d = xs.shape
  k1, k2 = jax.random.split(key)
  internal, leaves = 2**TREE_DEPTH - 1, 2**TREE_DEPTH
  coords = jax.random.randint(k1, (b, internal), 0, active)
  values = jax.random.normal(k2, (b, leaves))
  node = jnp.zeros(xs.shape[:2], jnp.int32)
  for _ in range(TREE_DEPTH):
    c = jnp.take_along_axis(coords, node, axis=1)
    go_right = jnp.take_along_axis(xs, c[..., None], axis=2)[..., 0] > 0
    node = 2 * node + 1 + go_right.astype(jnp.int32)
  return jnp.take_along_axis(values, node - internal, axis=1)


def _boolean(key, spec: FunctionSpec, xs, active):
  b, n, d = xs.shape
  k1, k2 = jax.random.split(key)
  in_use = jnp.arange(d) < active
  if spec.kind in ("conjunction", "disjunction"):
    u = jax.random.uniform(k1, (b, 1, d))
    literal = jnp.where(u < 0.15, 1.0, jnp.where(u < 0.3, -1.0, 0.0)) * in_use
    force = jax.random.bernoulli(k2, 0.3, (b, n, 1))
    want = literal if spec.kind == "conjunction" else -literal
    xs = jnp.where(force & (literal != 0), want, xs)
    satisfied = (literal == 0) | (xs == literal)
    y = satisfied.all(-1) if spec.kind == "conjunction" else (~satisfied).any(-1)
    if spec.kind == "disjunction":
      y = jnp.where((literal == 0).all(-1), False, y)
    return xs, jnp.where(y, 1.0, -1.0)
  if spec.kind == "sparse_parity":
    ranks = jnp.argsort(jax.random.uniform(k1, (b, d)) + (~in_use), axis=1)
    rows = jnp.arange(b)[:, None]
    subset = jnp.zeros((b, d), bool).at[rows, ranks[:, : spec.sparsity]].set(True)
  else:
    subset = jax.random.bernoulli(k1, 0.5, (b, d)) & in_use
  subset = subset[:, None, :]
  if spec.kind == "majority":
    y = jnp.where(jnp.sum(jnp.where(subset, xs, 0.0), -1) >= 0, 1.0, -1.0)
  else:
    y = jnp.prod(jnp.where(subset, xs, 1.0), -1)
  return xs, y


def _ar(key, spec: FunctionSpec, batch: int, n_points: int, p: int):
  k1, k2, k3 = jax.random.split(key, 3)
  a = jax.random.uniform(k1, (batch, p), minval=-1.0, maxval=1.0)
  a = a / jnp.maximum(1.0, jnp.abs(a).sum(-1, keepdims=True) / 0.95)
  burn = 4 * p
  total = burn + p + n_points
  noise = spec.ar_noise * jax.random.normal(k2, (total, batch))
  z0 = jax.random.normal(k3, (batch, p))  # (z_{t-1}, …, z_{t-p})

  def step(lags, eps):
    z = jnp.sum(a * lags, -1) + eps
    return jnp.concatenate([z[:, None], lags[:, :-1]], 1), (lags, z)

  _, (lags, z) = jax.lax.scan(step, z0, noise)
  xs, ys = jnp.swapaxes(lags, 0, 1)[:, -n_points:], z.T[:, -n_points:]
  return xs, ys


def sample(key, spec: FunctionSpec, batch: int, n_points: int, dim: int, active: int | None = None):
  """{xs [B,N,dim], ys [B,N], clean [B,N], sigma [B]}; only the first `active` coordinates of x
  are non-zero (curriculum; `active` may be traced). `clean` is f(x) without observation noise."""
  active = dim if active is None else active
  kx, kf, ks, kn = jax.random.split(key, 4)
  if spec.kind == "ar":
    xs, ys = _ar(kf, spec, batch, n_points, dim)
    return {"xs": xs, "ys": ys, "clean": ys, "sigma": jnp.zeros((batch,))}
  mask = (jnp.arange(dim) < active).astype(jnp.float32)
  xs = _inputs(kx, spec, (batch, n_points, dim)) * mask
  if spec.kind in BOOLEAN:
    xs, clean = _boolean(kf, spec, xs, active)
    xs = xs * mask
  elif spec.kind == "dtree":
    clean = _tree(kf, xs, active)
  elif spec.kind == "relu2nn":
    k1, k2 = jax.random.split(kf)
    w = jax.random.normal(k1, (batch, dim, spec.hidden)) * mask[:, None]
    a = jax.random.normal(k2, (batch, spec.hidden)) * jnp.sqrt(2.0 / spec.hidden)
    clean = jnp.einsum("bnh,bh->bn", jax.nn.relu(jnp.einsum("bnd,bdh->bnh", xs, w)), a)
  else:
    k1, k2 = jax.random.split(kf)
    w = spec.w_scale * jax.random.normal(k1, (batch, dim)) * mask
    if spec.kind == "sparse_linear":
      ranks = jnp.argsort(jax.random.uniform(k2, (batch, dim)) + (1 - mask), axis=1)
      keep = jnp.zeros((batch, dim)).at[jnp.arange(batch)[:, None], ranks[:, : spec.sparsity]]
      w = w * keep.set(1.0)
    clean = jnp.einsum("bnd,bd->bn", xs, w)
  sigma = _sigma(ks, spec, batch)
  ys = clean + sigma[:, None] * jax.random.normal(kn, clean.shape)
  return {"xs": xs, "ys": ys, "clean": clean, "sigma": sigma}


def interleave(xs, ys):
  """Garg's prompt: [B, 2N, d] with x_i at 2i and (y_i, 0, …, 0) at 2i + 1."""
  y_tokens = jnp.zeros_like(xs).at[..., 0].set(ys)
  b, n, d = xs.shape
  return jnp.stack([xs, y_tokens], axis=2).reshape(b, 2 * n, d)


def concat(xs, ys):
  """The GD-equivalence prompt: [B, N, d + 1], (x_i, y_i) for i < N, then (x_N, 0)."""
  ys = ys.at[:, -1].set(0.0)
  return jnp.concatenate([xs, ys[..., None]], axis=-1)


def prompt(data: dict, fmt: str) -> dict:
  """Batch arrays of a sample in a format: inputs, outputs_at [B,K], targets [B,K], sigma."""
  xs, ys = data["xs"], data["ys"]
  b, n, _ = xs.shape
  if fmt == "interleaved":
    at = jnp.broadcast_to(2 * jnp.arange(n, dtype=jnp.int32), (b, n))
    return {"inputs": interleave(xs, ys), "outputs_at": at, "targets": ys, "sigma": data["sigma"]}
  if fmt == "concat":
    return {
      "inputs": concat(xs, ys),
      "outputs_at": jnp.full((b, 1), n - 1, jnp.int32),
      "targets": data["clean"][:, -1:],
      "sigma": data["sigma"],
    }
  raise ValueError(f"unknown prompt format {fmt!r}; use {' or '.join(FORMATS)}")


def make_batch(key, spec: FunctionSpec, fmt: str, dim: int, batch: int, n_points: int, active=None):
  """A sampled batch in a prompt format with its error scale, as device arrays."""
  out = prompt(sample(key, spec, batch, n_points, dim, active), fmt)
  out["scale"] = jnp.full((batch,), error_scale(spec, dim if active is None else active))
  return out


_make_batch_jit = jax.jit(make_batch, static_argnums=(1, 2, 3, 4, 5, 6))


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Garg's curriculum: dimension and points grow by `*_inc` every `every` steps (0: off)."""

  every: int = 0
  dims_start: int = 5
  dims_inc: int = 1
  points_start: int = 11
  points_inc: int = 2

  def at(self, step: int, dim: int, n_points: int) -> tuple[int, int]:
    """(active dimension, number of points) at `step`."""
    if self.every == 0:
      return dim, n_points
    stage = step // self.every
    return (
      min(dim, self.dims_start + stage * self.dims_inc),
      min(n_points, self.points_start + stage * self.points_inc),
    )


@register_task("icl")
class InContextLearning(Task):
  """A fresh function per sequence every step, in either prompt format, for the Regressor.

  Eval segments `N<n>` are fixed batches of n points each (the training length and, for
  length generalisation, others). Metrics per example: `loss`, `error` (normalised squared
  error averaged over the predicted positions) and `error_last` (at the last point); Boolean
  classes add `accuracy` (sign agreement).
  """

  model_kind = "regressor"
  metric_names = ("loss", "error", "error_last")
  early_stop_metric = None

  def __init__(
    self,
    *,
    spec: FunctionSpec,
    dim: int,
    n_points: int,
    batch_size: int,
    fmt: str,
    seed: int,
    eval_points=(),
    eval_examples: int = 256,
    curriculum: Curriculum = Curriculum(),
  ):
    spec.check(dim)
    if fmt not in FORMATS:
      raise ValueError(f"unknown prompt format {fmt!r}; use {' or '.join(FORMATS)}")
    for name, value in (("dim", dim), ("batch_size", batch_size), ("eval_examples", eval_examples)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    eval_points = tuple(eval_points) or (n_points,)
    if min(n_points, *eval_points) < 2:
      raise ValueError(f"n_points and eval_points must be >= 2, got {n_points}, {eval_points}")
    self.spec, self.dim, self.n_points, self.batch_size = spec, dim, n_points, batch_size
    self.fmt, self.seed, self.curriculum = fmt, seed, curriculum
    self.eval_points, self.eval_examples = eval_points, eval_examples
    if spec.kind in BOOLEAN:
      self.metric_names = (*self.metric_names, "accuracy")

  @classmethod
  def from_config(cls, config) -> InContextLearning:
    d = config.data
    fields = {f.name for f in dataclasses.fields(FunctionSpec)}
    spec_args = {k: d[k] for k in fields if k in d}
    if "sigma_choices" in spec_args:
      spec_args["sigma_choices"] = tuple(float(s) for s in spec_args["sigma_choices"])
    curriculum = Curriculum(
      **{f.name: d.curriculum[f.name] for f in dataclasses.fields(Curriculum)}
    )
    return cls(
      spec=FunctionSpec(**spec_args),
      dim=d.dim,
      n_points=d.n_points,
      batch_size=d.batch_size,
      fmt=d.format,
      seed=config.seed,
      eval_points=tuple(d.eval_points),
      eval_examples=d.eval_examples,
      curriculum=curriculum,
    )

  @property
  def input_dim(self) -> int:
    return self.dim + (self.fmt == "concat")

  @property
  def max_seq_len(self) -> int:
    n = max(self.n_points, *self.eval_points)
    return 2 * n if self.fmt == "interleaved" else n

  def device_batch(self, key, batch: int, n_points: int, active: int | None = None) -> dict:
    """A batch as device arrays, traceable (for training loops that sample inside jit)."""
    return make_batch(key, self.spec, self.fmt, self.dim, batch, n_points, active)

  def batch(self, key, batch: int, n_points: int, active: int | None = None) -> Batch:
    out = _make_batch_jit(key, self.spec, self.fmt, self.dim, batch, n_points, active)
    return {k: np.asarray(v) for k, v in out.items()}

  def train_batch(self, step: int) -> Batch:
    active, n = self.curriculum.at(step, self.dim, self.n_points)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), 0), step)
    return self.batch(key, self.batch_size, n, active)

  def eval_sets(self) -> dict[str, list[Batch]]:
    out = {}
    for i, n in enumerate(self.eval_points):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), 1), i)
      full = self.batch(key, self.eval_examples, n)
      size = self.batch_size
      out[f"N{n}"] = [
        {k: v[j : j + size] for k, v in full.items()} for j in range(0, self.eval_examples, size)
      ]
    return out

  def model_kwargs(self) -> dict:
    return {"input_dim": self.input_dim, "output_dim": 1}

  def model_inputs(self, batch: Batch) -> dict:
    return {"inputs": batch["inputs"], "outputs_at": batch["outputs_at"]}

  def _errors(self, outputs, batch):
    """Squared error per predicted position over the prior variance: [B, K]."""
    return (outputs[..., 0] - batch["targets"]) ** 2 / batch["scale"][:, None]

  def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    if self.spec.kind in BOOLEAN:
      logits = outputs[..., 0]
      loss = optax.sigmoid_binary_cross_entropy(logits, (batch["targets"] > 0)).mean()
      return loss, {"accuracy": (jnp.sign(logits) == batch["targets"]).mean()}
    return jnp.mean((outputs[..., 0] - batch["targets"]) ** 2), {}

  def example_metrics(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    errors = self._errors(outputs, batch)
    out = {"error": errors.mean(-1), "error_last": errors[:, -1]}
    if self.spec.kind in BOOLEAN:
      logits = outputs[..., 0]
      bce = optax.sigmoid_binary_cross_entropy(logits, (batch["targets"] > 0))
      out["loss"] = bce.mean(-1)
      out["accuracy"] = (jnp.sign(logits) == batch["targets"]).mean(-1)
    else:
      out["loss"] = ((outputs[..., 0] - batch["targets"]) ** 2).mean(-1)
    return out
