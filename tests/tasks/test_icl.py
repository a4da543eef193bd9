"""ICL suite: generator statistics, prompt formats, every baseline against a closed form, the
GD-equivalence constructions, metrics, and the task with two mixers in both formats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.config import load_config_file
from attnzoo.models import icl_attention as lt
from attnzoo.tasks import icl
from attnzoo.tasks import icl_baselines as bl
from attnzoo.tasks import icl_metrics as metrics
from attnzoo.train.trainer import Experiment
from tests.conftest import REPO, slow

KEY = jax.random.key(0)


def draw(kind, batch=512, n=8, dim=6, **opts):
  data = icl.sample(KEY, icl.FunctionSpec(kind=kind, **opts), batch, n, dim)
  return {k: np.asarray(v, np.float64) for k, v in data.items()}


def test_generator_statistics():
  # sparse: Var(y) = s, and the least-squares weights of 8 > 6 points have exactly 3 non-zeros
  d = draw("sparse_linear")
  assert 0.85 < d["ys"].var() / 3 < 1.15
  w = np.stack([np.linalg.lstsq(x, y, rcond=None)[0] for x, y in zip(d["xs"][:4], d["ys"][:4])])
  assert ((np.abs(w) > 1e-4).sum(1) == 3).all()
  # noisy: the noise is fixed within a sequence at its own sigma ~ U(0, 2)
  d = draw("noisy_linear", batch=256, n=256, noise="uniform", sigma=2.0)
  assert 0 <= d["sigma"].min() and d["sigma"].max() <= 2.0 and d["sigma"].std() > 0.4
  assert np.abs((d["ys"] - d["clean"]).std(1) - d["sigma"]).max() < 0.25
  # Boolean: inputs and labels in {±1}; a conjunction is satisfied by 20-80% of inputs
  d = draw("conjunction", n=16, dim=8)
  assert set(np.unique(d["xs"])) <= {-1.0, 1.0} and set(np.unique(d["ys"])) <= {-1.0, 1.0}
  assert 0.2 < (d["ys"] > 0).mean() < 0.8
  # AR(3): x_t holds the previous p values; the series is stationary (bounded)
  d = draw("ar", batch=64, n=40, dim=3)
  np.testing.assert_allclose(d["xs"][:, 1:, 0], d["ys"][:, :-1], atol=1e-6)
  np.testing.assert_allclose(d["xs"][:, 1:, 1:], d["xs"][:, :-1, :-1], atol=1e-6)
  assert np.abs(d["ys"]).max() < 50
  # curriculum: the schedule of (active dimension, points)
  c = icl.Curriculum(every=10, dims_start=2, points_start=5)
  assert c.at(25, 6, 9) == (4, 9) and c.at(0, 6, 9) == (2, 5)


def test_prompt_formats():
  xs = jnp.arange(12.0).reshape(1, 3, 4)
  ys = jnp.array([[10.0, 20.0, 30.0]])
  p = icl.prompt({"xs": xs, "ys": ys, "clean": ys + 1, "sigma": jnp.zeros(1)}, "interleaved")
  assert p["inputs"].shape == (1, 6, 4)
  np.testing.assert_array_equal(p["inputs"][0, 2], xs[0, 1])
  np.testing.assert_array_equal(p["inputs"][0, 3], [20.0, 0, 0, 0])
  np.testing.assert_array_equal(p["outputs_at"], [[0, 2, 4]])
  p = icl.prompt({"xs": xs, "ys": ys, "clean": ys + 1, "sigma": jnp.zeros(1)}, "concat")
  np.testing.assert_array_equal(p["inputs"][0, :, -1], [10.0, 20.0, 0.0])
  np.testing.assert_array_equal(p["targets"], [[31.0]])  # the noiseless query target
  np.testing.assert_array_equal(p["outputs_at"], [[2]])


def problem(n=7, d=3, b=3, seed=1):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, n, d)).astype(np.float32), rng.normal(size=(b, n)).astype(np.float32)


@slow
def test_more_generator_statistics():
  # curriculum: coordinates past the active dimension are zero
  assert not np.asarray(icl.sample(KEY, icl.FunctionSpec(), 4, 5, 6, 2)["xs"])[..., 2:].any()
  for kind in ("linear", "relu2nn", "dtree"):
    ratio = draw(kind)["ys"].var() / icl.error_scale(icl.FunctionSpec(kind=kind), 6)
    assert 0.85 < ratio < 1.15, (kind, ratio)
  assert abs(draw("sparse_parity", n=16, dim=8)["ys"].mean()) < 0.05
  d = draw("noisy_linear", batch=64, noise="categorical", sigma_choices=(1.0, 3.0))
  assert set(np.round(d["sigma"], 6)) == {1.0, 3.0}
  for kind in ("disjunction", "majority", "parity"):
    d = draw(kind, n=16, dim=8)
    assert set(np.unique(d["xs"])) <= {-1.0, 1.0} and set(np.unique(d["ys"])) <= {-1.0, 1.0}
    assert abs(d["ys"].mean()) < 0.6, kind


def prefix_fit(xs, ys, fit):
  """Reference: at each k, fit(X_<k, y_<k) -> w, predict x_k (0 at k = 0)."""
  out = np.zeros(ys.shape)
  for b in range(len(xs)):
    for k in range(1, xs.shape[1]):
      out[b, k] = fit(xs[b, :k], ys[b, :k], b) @ xs[b, k]
  return out


def test_baselines_match_closed_forms():
  xs, ys = problem()
  d, lam = xs.shape[-1], np.array([0.5, 1.0, 2.0], np.float32)
  ridge_w = lambda x, y, b, lam_b: np.linalg.solve(x.T @ x + lam_b * np.eye(d), x.T @ y)
  expected = {
    "least_squares": prefix_fit(xs, ys, lambda x, y, b: np.linalg.pinv(x) @ y),
    "ridge": prefix_fit(xs, ys, lambda x, y, b: ridge_w(x, y, b, lam[b])),
    "averaging": prefix_fit(xs, ys, lambda x, y, b: (y[:, None] * x).mean(0)),
    "gd": prefix_fit(xs, ys, lambda x, y, b: 0.3 * x.T @ y / len(y)),
  }
  got = {
    "least_squares": bl.least_squares(xs, ys),
    "ridge": bl.ridge(xs, ys, lam),
    "averaging": bl.averaging(xs, ys),
    "gd": bl.gd(xs, ys, 0.3),
  }
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)

  # K-step GD and GD++ by the explicit recursion on (context, query, residuals)
  def gdpp_ref(eta, gamma, steps):
    out = np.zeros(ys.shape)
    for b in range(len(xs)):
      for k in range(1, xs.shape[1]):
        x, r, q, pred = xs[b, :k].copy(), ys[b, :k].copy(), xs[b, k].copy(), 0.0
        for _ in range(steps):
          dw = eta * x.T @ r / k
          pred, r = pred + dw @ q, r - x @ dw
          cov = x.T @ x / k
          q, x = q - gamma * cov @ q, x - gamma * x @ cov
        out[b, k] = pred
    return out

  np.testing.assert_allclose(bl.gd(xs, ys, 0.2, steps=3), gdpp_ref(0.2, 0.0, 3), rtol=1e-4)
  np.testing.assert_allclose(bl.gd_plus_plus(xs, ys, 0.2, 0.1, 2), gdpp_ref(0.2, 0.1, 2), rtol=1e-4)

  # AdaRR: σ̂² from the OLS residuals of the prefix (k > d), then ridge
  def ada(x, y, b):
    k = len(y)
    s2 = np.sum((y - x @ np.linalg.lstsq(x, y, rcond=None)[0]) ** 2) / (k - d) if k > d else 0
    return ridge_w(x, y, b, 2.0 * max(s2, 0.1))

  np.testing.assert_allclose(
    bl.ada_ridge(xs, ys, scale=2.0, clip_low=0.1), prefix_fit(xs, ys, ada), rtol=1e-4, atol=1e-5
  )

  # k-NN by brute force
  def knn_ref(k=3):
    out = np.zeros(ys.shape)
    for b in range(len(xs)):
      for i in range(1, xs.shape[1]):
        dist = ((xs[b, :i] - xs[b, i]) ** 2).sum(-1)
        out[b, i] = ys[b, np.argsort(dist)[:k]].mean()
    return out

  np.testing.assert_allclose(bl.knn(xs, ys, 3), knn_ref(), rtol=1e-5, atol=1e-6)

  # Lasso on an orthogonal design (XᵀX/k = I): soft-thresholding of Xᵀy/k
  q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(6, 3)))
  x = np.concatenate([q * np.sqrt(6), np.ones((1, 3))])[None]
  y = np.concatenate([x[0, :6] @ np.array([1.0, -0.05, 0.3]), [0.0]])[None]
  z = x[0, :6].T @ y[0, :6] / 6
  w = np.sign(z) * np.maximum(np.abs(z) - 0.1, 0)
  assert abs(w[1]) == 0 and w[0] != 0
  np.testing.assert_allclose(bl.lasso(x, y, 0.1)[0, -1], w.sum(), rtol=1e-4)
  w = np.random.default_rng(3).normal(size=(3, 3))
  linear = np.einsum("bnd,bd->bn", xs, w).astype(np.float32)
  best, losses = bl.line_search(bl.gd, xs, linear, [0.01, 0.5, 50.0])
  assert best == 0.5 and losses.shape == (3,)


def test_linear_self_attention_constructions_equal_gd():
  """von Oswald et al.: W_KQ selects x, W_PV = −η on y gives one GD step; stacked GD++ layers
  (ω_xx = −γ, ω_yx = −η) give GD++; FULL and DIAG forms of the same weights agree."""
  xs, ys = problem(n=9, d=4, b=3)
  tokens = icl.concat(jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32))
  eta, gamma, d = 0.4, 0.05, 4
  kq = jnp.zeros((d + 1, d + 1)).at[:d, :d].set(jnp.eye(d))
  full = [{"kq": kq, "pv": jnp.zeros((d + 1, d + 1)).at[d, d].set(-eta)}]
  gd1 = bl.gd(xs, ys, eta)[:, -1]
  np.testing.assert_allclose(lt.linear_transformer(full, tokens), gd1, rtol=1e-5)
  layers = [{"xx": jnp.array(-gamma), "yx": jnp.array(-eta)}] * 3
  np.testing.assert_allclose(
    lt.linear_transformer(layers, tokens), bl.gd_plus_plus(xs, ys, eta, gamma, 3)[:, -1], rtol=1e-4
  )
  diag = [{"xx": -gamma, "xy": 0.0, "yx": -eta, "yy": 0.0}] * 2
  pv = jnp.zeros((d + 1, d + 1)).at[:d, :d].set(-gamma * jnp.eye(d)).at[d, d].set(-eta)
  np.testing.assert_allclose(
    lt.linear_transformer(diag, tokens),
    lt.linear_transformer([{"kq": kq, "pv": pv}] * 2, tokens),
    rtol=1e-5,
  )
  # the gradient of the prediction w.r.t. the query matches GD's: cosine 1 (and −1 if flipped)
  gd_fn = lambda t: lt.linear_transformer(full, t)
  flipped = lambda t: -lt.linear_transformer(full, t)
  np.testing.assert_allclose(metrics.gradient_cosine(gd_fn, gd_fn, tokens), 1.0, rtol=1e-5)
  np.testing.assert_allclose(metrics.gradient_cosine(flipped, gd_fn, tokens), -1.0, rtol=1e-5)


def test_attention_heads_and_weight_diagnostics():
  """He et al.'s head pair: KQ = ω I on x, OV = μ on y gives ŷ = Σ_h μ_h Σ_i softmax(ω_h x_iᵀx_q
  /sqrt(d+1)) y_i; the diagnostics read ω, μ, Σμ back."""
  xs, ys = problem(n=6, d=3, b=2)
  tokens = icl.concat(jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32))
  d, omega, mu = 3, np.array([0.7, -0.7]), np.array([2.0, -2.0])
  eye = jnp.eye(d + 1).at[d, d].set(0.0)
  params = {
    "q": jnp.stack([w * eye for w in omega]),
    "k": jnp.stack([eye, eye]),
    "v": jnp.stack([jnp.eye(d + 1)] * 2),
    "o": jnp.zeros((2, d + 1)).at[:, d].set(mu),
  }
  s = np.einsum("bid,bd->bi", xs[:, :-1], xs[:, -1]) / 2.0
  expect = sum(
    m * (np.exp(w * s) / np.exp(w * s).sum(1, keepdims=True) * ys[:, :-1]).sum(1)
    for w, m in zip(omega, mu)
  )
  np.testing.assert_allclose(lt.attention_heads(params, tokens), expect, rtol=1e-5)
  linear = sum(m * (w * s * ys[:, :-1]).sum(1) for w, m in zip(omega, mu))
  np.testing.assert_allclose(lt.attention_heads(params, tokens, softmax=False), linear, rtol=1e-5)
  diag = metrics.weight_diagnostics(*lt.head_matrices(params))
  np.testing.assert_allclose(diag["kq_diag_fraction"], 1.0)
  np.testing.assert_allclose(diag["kq_diag_cv"], 0.0, atol=1e-7)
  np.testing.assert_allclose(diag["omega"], omega, rtol=1e-6)
  np.testing.assert_allclose(diag["ov_y_fraction"], 1.0)
  np.testing.assert_allclose(diag["mu_sum"], 0.0, atol=1e-6)


def test_error_curve_and_length_metrics():
  preds = np.array([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
  targets = np.zeros((2, 3))
  curve = metrics.error_curve(preds, targets, scale=np.array([1.0, 2.0]))
  np.testing.assert_allclose(curve["mean"], [(1 + 4.5) / 2, (4 + 2) / 2, 0.0])
  assert (curve["low"] <= curve["mean"]).all() and (curve["mean"] <= curve["high"]).all()
  assert curve["low"][0] == 1.0 and curve["high"][0] == 4.5 and curve["low"][2] == 0.0
  assert metrics.beyond_length(np.array([1.0, 2.0, 4.0, 6.0]), 2) == 5.0
  with pytest.raises(ValueError):
    metrics.beyond_length(np.ones(3), 3)


@pytest.mark.parametrize(("mixer", "fmt"), [("attention", "interleaved"), ("gla", "concat")])
def test_task_with_mixers_in_both_formats(mixer, fmt):
  """The prompt runs through the mixer; a prediction never sees its own target (interleaved:
  changing y_1 leaves the predictions at x_0, x_1 unchanged; concat: the query's y is 0)."""
  config = load_config_file(
    f"{REPO}/configs/icl/icl.py:mixer={mixer},format={fmt},dim=3,n_points=6,d_model=16,"
    "num_layers=1,batch_size=4,state_mixer=identity"
  )
  exp = Experiment(config)
  params = exp.init_state()["params"]
  batch = exp.task.train_batch(0)
  apply = jax.jit(exp._outputs)
  out = np.asarray(apply(params, batch))
  if fmt == "interleaved":
    changed = dict(batch, inputs=batch["inputs"].copy())
    changed["inputs"][:, 3, 0] += 5.0  # y_1, read after the prediction at x_1 (position 2)
    moved = np.asarray(apply(params, changed))
    np.testing.assert_allclose(moved[:, :2], out[:, :2], rtol=1e-6)
    assert not np.allclose(moved[:, 2:], out[:, 2:])
  else:
    assert batch["inputs"][:, -1, -1].max() == 0 and out.shape == (4, 1, 1)
  assert np.isfinite(out).all()


def test_induction_training_spans_vary():
  """Training patterns have per-row lengths in [min_span, span] (so no fixed offset predicts a
  repeat), each row periodic with its own length; the repeat mask follows each row's span."""
  from attnzoo.tasks import induction

  task = induction.InductionHeads(
    vocab_size=50, span=12, min_span=3, repeats=3, batch_size=64, seed=0
  )
  batch = task.train_batch(7)
  tokens = np.concatenate([batch["inputs"], batch["labels"][:, -1:]], 1)[:, 1:]
  spans = batch["span"]
  assert spans.min() >= 3 and spans.max() <= 12 and len(set(spans.tolist())) > 5
  for row, p in zip(tokens, spans):
    np.testing.assert_array_equal(row[p:], row[:-p])
  repeat = np.asarray(task._repeat_mask(batch["labels"].shape, jnp.asarray(spans)))
  np.testing.assert_array_equal(repeat.sum(1), 36 - spans)
  with pytest.raises(ValueError, match="min_span"):
    induction.InductionHeads(vocab_size=50, span=12, min_span=13, repeats=3, batch_size=4, seed=0)


def test_induction_head_scores():
  """An ideal induction head scores 1 on prefix matching and 0 on previous token, and the
  reverse for a previous-token head; a 1-layer model's maps come back per layer."""
  from attnzoo.tasks import induction

  span, repeats = 4, 3
  T = span * repeats  # the inputs: BOS plus all but the last token
  mask = induction.earlier_successors(span, T)
  assert mask[5, 2] == 1 and mask[9, 2] == 1 and mask[9, 6] == 1 and mask[:5].sum() == 0
  ideal = mask / np.maximum(mask.sum(-1, keepdims=True), 1)
  ideal[: span + 1, 0] = 1.0  # the first repeat rests on BOS
  prev = np.eye(T, k=-1)
  prev[0, 0] = 1.0
  attn = jnp.asarray(np.stack([ideal, prev])[None])
  np.testing.assert_allclose(induction.prefix_matching_score(attn, span), [1.0, 0.0], atol=1e-6)
  # the ideal head looks at i − 1 only from position 1 (onto BOS): 1 of T − 1 rows
  np.testing.assert_allclose(induction.previous_token_score(attn), [1 / (T - 1), 1.0], rtol=1e-6)
  config = load_config_file(
    f"{REPO}/configs/icl/induction.py:d_model=16,num_layers=1,span={span},repeats={repeats},"
    "batch_size=2,vocab_size=16,min_span=2"
  )
  exp = Experiment(config)
  params = exp.init_state()["params"]
  tokens = exp.task.eval_sets()[f"span{span}_x{repeats}"][0]["inputs"]  # Olsson's fixed probe
  np.testing.assert_array_equal(tokens[:, 1 : 1 + span], tokens[:, 1 + span : 1 + 2 * span])
  (maps,) = induction.attention_maps(exp.model, params, tokens)
  assert maps.shape == (2, 4, T, T)
  np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
  assert induction.prefix_matching_score(maps, span).shape == (4,)
