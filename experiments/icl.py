"""In-context learning reproductions F1–F5 (issue #15; setups in ../shared/research/icl.md).

  python experiments/icl.py f1 [--tiny] [--families]   Garg et al. 2022 Fig. 2 (linear regression;
                                                       --families: only the per-mixer table)
  python experiments/icl.py f2 [--tiny]                von Oswald et al. 2023 (LSA = one GD step)
  python experiments/icl.py f3 [--tiny]                He et al. 2025 (seed #17), H ∈ {1,2,4,8}
  python experiments/icl.py f4 [--tiny]                Vladymyrov et al. 2024 Table 1 (seed #46)
  python experiments/icl.py f5 [--tiny]                Olsson et al. 2022 induction heads (#96)

Each writes `<name>.md` (measured numbers beside the paper's, pass/fail lines), `<name>.json`
and `<name>.png` to experiments/results/icl/ (with --tiny: experiments/results/icl/tiny/, a
CPU smoke setting whose numbers mean nothing). Training samples every batch on the device
inside `lax.scan` chunks, keyed on (seed, step).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import sys
import threading
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from attnzoo.config import load_config_file, set_typed  # noqa: E402
from attnzoo.mixers import MIXERS  # noqa: E402
from attnzoo.mixers.registry import causal_mixers  # noqa: E402
from attnzoo.models import icl_attention as lt  # noqa: E402
from attnzoo.tasks import icl, induction  # noqa: E402
from attnzoo.tasks import icl_baselines as bl  # noqa: E402
from attnzoo.tasks import icl_metrics as metrics  # noqa: E402
from attnzoo.train.optim import make_optimizer  # noqa: E402
from attnzoo.train.trainer import Experiment  # noqa: E402


def fit(
  loss_fn,
  params,
  steps: int,
  lr: float,
  seed: int,
  chunk: int = 100,
  clip: float = 1.0,
  cosine: bool = False,
):
  """Adam on loss_fn(params, key) for `steps` steps (key = fold_in(seed, step)); returns the
  params and the mean loss of each chunk. cosine: 5% linear warm-up, then cosine decay to 0.
  A step whose gradient is not finite is skipped (deep linear transformers can overflow on a
  rare high-noise batch)."""
  if cosine:
    lr = optax.warmup_cosine_decay_schedule(0.0, lr, steps // 20, steps, 0.0)
  opt = optax.apply_if_finite(
    optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr)), max_consecutive_errors=100
  )
  state = opt.init(params)
  base = jax.random.key(seed)

  @jax.jit
  def run(params, state, start):
    def body(carry, step):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(base, step))
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    (params, state), losses = jax.lax.scan(body, (params, state), start + jnp.arange(chunk))
    return params, state, losses.mean()

  curve = []
  for start in range(0, steps, chunk):
    params, state, loss = run(params, state, start)
    curve.append(float(loss))
  return params, curve


def write(out: pathlib.Path, name: str, lines: list[str], data: dict, fig) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.md").write_text("\n".join(lines) + "\n")
  (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=float))
  fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  print("\n".join(lines))
  print(f"wrote {out / name}.md/.json/.png")


# ----------------------------------------------------------------------------- F1 (Garg)


def train_regressor(arg: str, steps: int, seed: int, curriculum_every: int):
  """Trains the Regressor of configs/icl/icl.py:<arg> with on-device sampling and the optimiser
  of `attnzoo train` (AdamW, warm-up, cosine to lr · min_lr_ratio, clipping); returns
  (experiment, params, loss curve)."""
  config = load_config_file(f"{REPO}/configs/icl/icl.py:{arg}")
  set_typed(config, "seed", seed)
  set_typed(config, "train.num_steps", steps)
  set_typed(config, "data.curriculum.every", curriculum_every)
  exp = Experiment(config)
  task, tc = exp.task, config.train
  params = exp.init_state()["params"]
  opt = make_optimizer(tc, steps)
  state = opt.init(params)
  base = jax.random.key(seed)
  chunk, cur = min(500, steps), task.curriculum  # steps: a multiple of the chunk

  @jax.jit
  def run(params, state, start):
    def body(carry, step):
      params, state = carry
      # Garg's curriculum over the dimension (traced: one compile); the points stay fixed.
      active = task.dim
      if cur.every:
        active = jnp.minimum(task.dim, cur.dims_start + cur.dims_inc * (step // cur.every))
      key = jax.random.fold_in(base, step)
      batch = task.device_batch(key, task.batch_size, task.n_points, active)
      loss, grads = jax.value_and_grad(lambda p: exp._loss(p, batch)[0])(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    (params, state), losses = jax.lax.scan(body, (params, state), start + jnp.arange(chunk))
    return params, state, losses.mean()

  curve = []
  for start in range(0, steps, chunk):
    params, state, loss = run(params, state, start)
    curve.append(float(loss))
  return exp, params, curve


def f1_curves(exp, params, n_eval: int, examples: int, seed: int):
  task = exp.task
  batch = task.device_batch(jax.random.key(10_000 + seed), examples, n_eval)
  data = icl.sample(jax.random.key(10_000 + seed), task.spec, examples, n_eval, task.dim)
  preds = jax.jit(exp._outputs)(params, batch)[..., 0]
  xs, ys = data["xs"], data["ys"]
  scale = np.asarray(batch["scale"])
  estimators = {
    "transformer": preds,
    "least squares": bl.least_squares(xs, ys),
    "averaging": bl.averaging(xs, ys),
    "3-NN": bl.knn(xs, ys, 3),
  }
  return {k: metrics.error_curve(v, ys, scale) for k, v in estimators.items()}


def f1(args):
  tiny, out = args.tiny, args.out
  d = 3 if tiny else 10
  n = 2 * d + 1
  size = "d_model=16,num_layers=1" if tiny else "d_model=128,num_layers=4,num_heads=4"
  steps = 40 if tiny else args.steps or 40_000
  every = 0 if tiny else 2000  # Garg's interval: dims 5 -> d, one more every 2000 steps
  if args.families:  # only the per-family table
    f1_families(args, *((3, 7, 40) if tiny else (5, 11, args.steps or 6000)))
    return
  arg = f"function=linear,dim={d},n_points={n},batch_size={32 if tiny else 64},{size}"
  extra = "" if tiny else ",lr=0.0001"  # Garg's batch and learning rate
  t0 = time.time()
  exp, params, curve = train_regressor(arg + extra, steps, args.seed, every)
  examples = 64 if tiny else 1280
  curves = f1_curves(exp, params, n, examples, args.seed)
  elapsed = time.time() - t0
  err = curves["transformer"]["mean"]
  lines = [
    f"# F1 Garg et al. 2022 Fig. 2: linear regression, d = {d}, {exp.task.n_points} points",
    "",
    f"Model: Regressor, attention, `{arg}{extra}`, {steps} steps, seed {args.seed}, "
    + (
      f"curriculum on the dimension (from 5, +1 every {every} steps; points fixed)"
      if every
      else "no curriculum"
    )
    + f"; {elapsed:.0f} s on {jax.devices()[0].device_kind}. Error = squared error / d over"
    f" {examples} prompts (90% bootstrap).",
    "",
    "| estimator | k = d | k = 2d | paper (d = 20, 12L/8H/256, k = d / 2d) |",
    "|---|---|---|---|",
  ]
  paper = {"transformer": "0.02 / 0.0006"}
  for name, c in curves.items():
    lines.append(
      f"| {name} | {c['mean'][d]:.4f} | {c['mean'][2 * d]:.4f} | {paper.get(name, '')} |"
    )
  ok = err[2 * d] <= 0.05
  lines += ["", f"F1 {'PASS' if ok else 'FAIL'}: error at k = 2d = {err[2 * d]:.4f} (≤ 0.05)."]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, c in curves.items():
    ax.plot(c["mean"], label=name)
    ax.fill_between(range(len(c["mean"])), c["low"], c["high"], alpha=0.2)
  ax.set(xlabel="in-context examples k", ylabel="squared error / d", ylim=(0, 1.5))
  ax.legend()
  data = {"curves": {k: {m: v.tolist() for m, v in c.items()} for k, c in curves.items()}}
  write(out, "f1", lines, {**data, "train_loss": curve}, fig)


def f1_families(args, d: int, n: int, steps: int):
  """F1 at one size for every causal mixer: error at k = d and k = 2d. Mixers train in
  `--workers` threads (compiles overlap on the host's cores, the device runs one at a time);
  the table is rewritten as each finishes, so a run cut short keeps what it measured."""
  size = "d_model=16,num_layers=1" if args.tiny else "lr=0.0003"  # Garg's small model
  names = [m for m in causal_mixers() if not MIXERS[m].uses_block_ids]
  done: dict[str, dict] = {}
  lock = threading.Lock()

  def row(mixer: str) -> None:
    t0 = time.time()
    arg = f"function=linear,dim={d},n_points={n},batch_size={32 if args.tiny else 64},{size}"
    try:
      exp, params, _ = train_regressor(f"{arg},mixer={mixer}", steps, args.seed, 0)
      err = f1_curves(exp, params, n, 64 if args.tiny else 1280, args.seed)["transformer"]["mean"]
      result = {"k=d": float(err[d]), "k=2d": float(err[2 * d])}
    except Exception as e:  # a mixer that cannot run this setting is listed with its reason
      result = {"error": f"{type(e).__name__}: {str(e)[:60]}"}
    with lock:
      done[mixer] = {**result, "seconds": round(time.time() - t0)}
      write_table()

  def write_table() -> None:
    cell = lambda r, key: f"{r[key]:.4f}" if key in r else "–"
    rows = [
      f"| {m} | {cell(r, 'k=d')} | {cell(r, 'k=2d')} | {r['seconds']} | {r.get('error', '')} |"
      for m, r in sorted(done.items())
    ]
    lines = [
      f"# F1 per mixer family: linear regression d = {d}, {size}, {steps} steps, no curriculum",
      "",
      f"Error = squared error / d at the query, {64 if args.tiny else 1280} prompts, seed"
      f" {args.seed}; configs/icl/icl.py's model (3 layers, width 64, 2 heads where the mixer"
      " has heads, MLPs); least squares is 0 at k >= d."
      " Seconds: wall time of each mixer's run,"
      f" {args.workers} at once on {jax.devices()[0].device_kind}. Not yet run:"
      f" {', '.join(m for m in names if m not in done) or 'none'}.",
      "",
      "| mixer | error k = d | error k = 2d | seconds | note |",
      "|---|---|---|---|---|",
      *rows,
    ]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ok = sorted((m, r["k=2d"]) for m, r in done.items() if "k=2d" in r)
    ax.bar([m for m, _ in ok], [e for _, e in ok])
    ax.set_yscale("log")
    ax.set_ylabel("error at k = 2d")
    ax.tick_params(axis="x", rotation=90)
    write(args.out, "f1_families", lines, done, fig)

  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    list(pool.map(row, names))


# ----------------------------------------------------------------------- F2 (von Oswald)


def f2(args):
  tiny, out = args.tiny, args.out
  d = 3 if tiny else 10
  spec = icl.FunctionSpec(kind="linear", x_dist="uniform", x_scale=1.0)
  batch, steps = (64, 200) if tiny else (2048, args.steps or 5_000)
  tokens_of = lambda key, b: icl.make_batch(key, spec, "concat", d, b, d + 1)
  test = tokens_of(jax.random.key(99), 256 if tiny else 10_000)
  xs, ys = (
    test["inputs"][:, :, :-1],
    jnp.concatenate([test["inputs"][:, :-1, -1], test["targets"]], 1),
  )
  grid = np.geomspace(0.05, 5, 40)
  lines = [
    f"# F2 von Oswald et al. 2023: linear self-attention vs gradient descent, d = N = {d}",
    "",
    f"x ~ U(-1, 1), w ~ N(0, I), noiseless; FULL linear transformer (init 0.002), Adam 1e-3,"
    f" batch {batch}, {steps} steps, seed {args.seed}; GD's η (and GD++'s γ) by line search on"
    f" {len(ys)} tasks; loss = mean squared error at the query.",
    "",
    "| layers K | model loss | K-step GD loss | GD++ loss | ‖ŷ − ŷ_GD‖² | grad cosine |",
    "|---|---|---|---|---|---|",
  ]
  results, fig = {}, plt.figure(figsize=(5, 3.5))
  for layers in (1, 2, 3):

    def loss_fn(p, key):
      b = tokens_of(key, batch)
      return jnp.mean((lt.linear_transformer(p, b["inputs"]) - b["targets"][:, 0]) ** 2)

    p0 = lt.init_linear_transformer(jax.random.key(args.seed), "full", layers, d)
    params, curve = fit(loss_fn, p0, steps, 1e-3, args.seed)
    pred = lt.linear_transformer(params, test["inputs"])
    eta, _ = bl.line_search(lambda x, y, v: bl.gd(x, y, v, layers), xs, ys, grid)
    best_pp = min(
      (float(jnp.mean((bl.gd_plus_plus(xs, ys, e, g, layers)[:, -1] - ys[:, -1]) ** 2)), e, g)
      for e in grid[::4]
      for g in (0.0, 0.05, 0.1, 0.2, 0.3)
    )
    gd_layers = [{"xx": jnp.array(0.0), "yx": jnp.array(-eta)}] * layers
    gd_pred = lt.linear_transformer(gd_layers, test["inputs"])
    cos = metrics.gradient_cosine(
      lambda t: lt.linear_transformer(params, t),
      lambda t: lt.linear_transformer(gd_layers, t),
      test["inputs"][:512],
    )
    model_loss = float(jnp.mean((pred - ys[:, -1]) ** 2))
    gd_loss = float(jnp.mean((gd_pred - ys[:, -1]) ** 2))
    gap = float(jnp.mean((pred - gd_pred) ** 2))
    results[layers] = dict(
      model=model_loss, gd=gd_loss, gdpp=best_pp[0], gap=gap, cos=float(cos.mean()), eta=eta
    )
    lines.append(
      f"| {layers} | {model_loss:.4f} | {gd_loss:.4f} | {best_pp[0]:.4f} | {gap:.2e} |"
      f" {cos.mean():.4f} |"
    )
    plt.plot(np.arange(len(curve)) * 100, curve, label=f"LSA, K = {layers}")
    plt.axhline(gd_loss, ls="--", lw=0.8, color=plt.gca().lines[-1].get_color())
  plt.yscale("log")
  plt.xlabel("step")
  plt.ylabel("query loss")
  plt.legend()
  ok = results[1]["cos"] > 0.99
  lines += [
    "",
    "Paper: a trained single layer matches one GD step (cosine ≈ 1); K layers beat K GD steps"
    " and match GD++.",
    f"F2 {'PASS' if ok else 'FAIL'}: K = 1 gradient cosine {results[1]['cos']:.4f} (> 0.99).",
  ]
  write(out, "f2", lines, results, fig)


# --------------------------------------------------------------------------- F3 (He et al.)


def f3(args):
  tiny, out = args.tiny, args.out
  d, L, sigma = 5, 40, float(np.sqrt(0.1))
  spec = icl.FunctionSpec(kind="noisy_linear", sigma=sigma, w_scale=1 / np.sqrt(d))
  batch, steps = (64, 200) if tiny else (256, args.steps or 20_000)
  heads = (1, 2) if tiny else (1, 2, 4, 8)
  runs = [("softmax", h) for h in heads] + [("linear", 2)]
  lengths = (10, 20, 40) if tiny else (10, 20, 40, 60, 80, 100)
  examples = 256 if tiny else 4096
  results, fig = {}, plt.figure(figsize=(5, 3.5))
  for kind, h in runs:

    def loss_fn(p, key, kind=kind):
      b = icl.make_batch(key, spec, "concat", d, batch, L + 1)
      pred = lt.attention_heads(p, b["inputs"], softmax=kind == "softmax")
      return jnp.mean((pred - b["targets"][:, 0]) ** 2)

    params, _ = fit(
      loss_fn, lt.init_attention_heads(jax.random.key(args.seed), h, d), steps, 1e-3, 0
    )
    errs = {}
    for n in lengths:
      b = icl.make_batch(jax.random.key(7), spec, "concat", d, examples, n + 1)
      pred = lt.attention_heads(params, b["inputs"], softmax=kind == "softmax")
      errs[n] = float(jnp.mean((pred - b["targets"][:, 0]) ** 2))
    diag = metrics.weight_diagnostics(*lt.head_matrices(params))
    results[f"{kind}-H{h}"] = {"loss": errs, **{k: np.asarray(v).tolist() for k, v in diag.items()}}
    plt.plot(lengths, [errs[n] for n in lengths], "o-", label=f"{kind}, H = {h}")
  ridge = {}
  for n in lengths:
    data = icl.sample(jax.random.key(7), spec, examples, n + 1, d)
    pred = bl.ridge(data["xs"], data["ys"], d * sigma**2)[:, -1]
    ridge[n] = float(jnp.mean((pred - data["clean"][:, -1]) ** 2))
  plt.plot(lengths, [ridge[n] for n in lengths], "k--", label="ridge λ = dσ² (Bayes)")
  plt.axvline(L, color="grey", lw=0.5)
  plt.xlabel("context length L")
  plt.ylabel("query MSE")
  plt.yscale("log")
  plt.legend(fontsize=7)
  lines = [
    f"# F3 He et al. 2025 (seed #17): one softmax layer, d = {d}, L = {L}, σ² = 0.1",
    "",
    f"β ~ N(0, I/d), Adam 1e-3, batch {batch}, {steps} steps, seed {args.seed}; loss = query MSE"
    f" against the noiseless target over {examples} prompts per length.",
    "",
    "| model | " + " | ".join(f"L = {n}" for n in lengths) + " | ω per head | μ per head | Σμ |",
    "|---|" + "---|" * len(lengths) + "---|---|---|",
  ]
  for name, r in results.items():
    lines.append(
      f"| {name} | "
      + " | ".join(f"{r['loss'][n]:.4f}" for n in lengths)
      + f" | {np.round(r['omega'], 3).tolist()} | {np.round(r['mu'], 2).tolist()} |"
      f" {r['mu_sum']:.3f} |"
    )
  lines.append("| ridge λ = dσ² | " + " | ".join(f"{ridge[n]:.4f}" for n in lengths) + " | | | |")
  one, two, lin = results["softmax-H1"], results["softmax-H2"], results["linear-H2"]
  far = lengths[-1]
  mu = np.asarray(two["mu"])
  checks = {
    "multi-head beats single-head at L = 40": two["loss"][L if L in lengths else far]
    < one["loss"][L if L in lengths else far],
    "H = 2 heads pair with opposite signs of ω and μ": bool(
      np.sign(two["omega"][0]) != np.sign(two["omega"][1]) and np.sign(mu[0]) != np.sign(mu[1])
    ),
    "Σμ ≈ 0 (|Σμ| < 0.1 max|μ|)": abs(two["mu_sum"]) < 0.1 * np.abs(mu).max(),
    f"softmax holds past L = 40 (error at L = {far} ≤ 1.1× L = 40)": two["loss"][far]
    <= 1.1 * two["loss"].get(L, two["loss"][far]),
    f"linear attention degrades (error at L = {far} > 1.2× L = 40)": lin["loss"][far]
    > 1.2 * lin["loss"].get(L, lin["loss"][far]),
  }
  lines += [
    "",
    "Paper: (ω, μ) ≈ (±0.13, ±3.45) for the pair at d = 5, L = 40; extra heads become dummies;"
    " softmax flat over L, linear attention degrades.",
    "",
    *[f"F3 {'PASS' if ok else 'FAIL'}: {what}." for what, ok in checks.items()],
  ]
  write(out, "f3", lines, {"runs": results, "ridge": ridge}, fig)


# ----------------------------------------------------------------------- F4 (Vladymyrov)


LR_F4 = 1e-4  # the paper's; 3e-4 and 1e-3 diverged at 4 layers (H200 runs, 2026-12-03)


def f4(args):
  tiny, out = args.tiny, args.out
  d, n_ctx, sigma_max = (3, 6, 5.0) if tiny else (10, 20, 5.0)
  spec = icl.FunctionSpec(kind="noisy_linear", noise="uniform", sigma=sigma_max)
  batch, steps = (64, 200) if tiny else (1024, args.steps or 40_000)
  depths = (1, 2) if tiny else (1, 2, 3, 4)
  test = icl.make_batch(jax.random.key(5), spec, "concat", d, 512 if tiny else 20_000, n_ctx + 1)
  xs = test["inputs"][:, :-1, :-1]
  ys_ctx = test["inputs"][:, :-1, -1]
  xq, yq = test["inputs"][:, -1:, :-1], test["targets"][:, 0]
  full_x = jnp.concatenate([xs, xq], 1)
  full_y = jnp.concatenate([ys_ctx, yq[:, None]], 1)
  # the papers' loss is ½ (ŷ − y)²: without the ½ every baseline here measured 1.98-2.03x its
  # Table 1 value (ConstRR 0.721 vs 0.365, AdaRR 0.138 vs 0.068; H200 run of 2026-12-03)
  half_mse = lambda pred: float(0.5 * jnp.mean((pred - yq) ** 2))
  oracle = half_mse(bl.ridge(full_x, full_y, test["sigma"] ** 2)[:, -1])
  const = min(half_mse(bl.ridge(full_x, full_y, lam)[:, -1]) for lam in np.geomspace(0.1, 30, 25))
  ada = half_mse(bl.ada_ridge(full_x, full_y)[:, -1])
  results = {"oracle": oracle, "ConstRR": const - oracle, "AdaRR": ada - oracle}
  fig = plt.figure(figsize=(5, 3.5))
  for kind in ("full", "diag", "gdpp"):
    row = {}
    for layers in depths:

      def loss_fn(p, key):
        b = icl.make_batch(key, spec, "concat", d, batch, n_ctx + 1)
        return jnp.mean((lt.linear_transformer(p, b["inputs"]) - b["targets"][:, 0]) ** 2)

      p0 = lt.init_linear_transformer(jax.random.key(args.seed), kind, layers, d, scale=0.05)
      params, _ = fit(loss_fn, p0, steps, LR_F4, args.seed, cosine=True)
      row[layers] = half_mse(lt.linear_transformer(params, test["inputs"])) - oracle
    results[kind] = row
    plt.plot(depths, [row[k] for k in depths], "o-", label=kind.upper())
  for name, ls in (("ConstRR", ":"), ("AdaRR", "--")):
    plt.axhline(results[name], ls=ls, color="k", lw=0.8, label=name)
  plt.xlabel("layers")
  plt.ylabel("adjusted loss (− oracle ridge)")
  plt.legend()
  paper = {"diag": (0.906, 0.242, 0.118, 0.059), "full": (0.907, 0.245, 0.117, 0.065)}
  paper["gdpp"] = (0.907, 0.366, 0.344, 0.344)
  lines = [
    f"# F4 Vladymyrov et al. 2024 Table 1 (seed #46): noisy regression, σ ~ U(0, {sigma_max})",
    "",
    f"d = {d}, N = {n_ctx}, w, x ~ N(0, I), noiseless query target; linear transformers (init"
    f" 0.05), Adam {LR_F4:g} with 5% warm-up and cosine decay, batch {batch}, {steps} steps, seed"
    f" {args.seed} (paper: Adam 1e-4, batch 2048, 200k steps, best of 5 seeds; 1e-3 and 3e-4 made"
    f" the 4-layer models diverge here). Adjusted loss = ½ query MSE − ½ oracle ridge MSE"
    f" ({oracle:.4f}) over {len(yq)} prompts.",
    "",
    "| model | " + " | ".join(f"{k} layers (paper)" for k in depths) + " |",
    "|---|" + "---|" * len(depths),
  ]
  for kind in ("diag", "full", "gdpp"):
    cells = [f"{results[kind][k]:.3f} ({paper[kind][k - 1]})" for k in depths]
    lines.append(f"| {kind.upper()} | " + " | ".join(cells) + " |")
  lines += [
    f"| ConstRR | {results['ConstRR']:.3f} (0.365) |",
    f"| AdaRR | {results['AdaRR']:.3f} (0.068) |",
  ]
  deepest = depths[-1]
  ok = results["diag"][deepest] < results["AdaRR"]
  lines += [
    "",
    f"F4 {'PASS' if ok else 'FAIL'}: DIAG-{deepest} adjusted loss {results['diag'][deepest]:.3f}"
    f" below AdaRR {results['AdaRR']:.3f} (paper: DIAG-4 0.059 < AdaRR 0.068).",
  ]
  write(out, "f4", lines, results, fig)


# ------------------------------------------------------------------ F5 (induction heads)


def f5(args):
  tiny, out = args.tiny, args.out
  steps = 20 if tiny else args.steps or 8_000
  every = 10 if tiny else 200
  size = (
    "d_model=16,span=5,min_span=2,repeats=3,vocab_size=16,batch_size=8" if tiny else "d_model=64"
  )
  runs = [("attention", 1), ("attention", 2)]
  runs += [(m, 2) for m in (("gla",) if tiny else ("gla", "deltanet", "retnet", "mamba2"))]
  logs, fig = {}, plt.subplots(1, 2, figsize=(9, 3.5))[0]
  for mixer, layers in runs:
    config = load_config_file(
      f"{REPO}/configs/icl/induction.py:mixer={mixer},num_layers={layers},{size},"
      f"num_steps={steps},seed={args.seed}"
    )
    try:
      exp = Experiment(config)
    except ValueError as e:  # a mixer that cannot run this setting is reported, not fatal
      print(f"skipping {mixer}: {e}")
      continue
    task, state, t0 = exp.task, exp.init_state(), time.time()
    probe = task.eval_sets()[next(iter(task.eval_sets()))][0]
    maps_fn = jax.jit(lambda p, tokens: induction.attention_maps(exp.model, p, tokens))
    log = []
    for step in range(steps + 1):
      if step % every == 0:
        maps = maps_fn(state["params"], probe["inputs"])
        prefix = [np.asarray(induction.prefix_matching_score(m, task.span)) for m in maps]
        prev = [np.asarray(induction.previous_token_score(m)) for m in maps]
        ev = jax.device_get(exp.eval_step(state["params"], probe))
        log.append(
          dict(
            step=step,
            loss_repeat=float(np.mean(ev["loss_repeat"])),
            loss_first=float(np.mean(ev["loss_first"])),
            prefix=[p.tolist() for p in prefix],
            previous=[p.tolist() for p in prev],
          )
        )
      if step < steps:
        state, _ = exp.train_step(state, task.train_batch(step))
    name = f"{mixer}-{layers}L"
    logs[name] = {"log": log, "seconds": time.time() - t0}
    best = [max(max(h) for h in r["prefix"]) for r in log]
    fig.axes[0].plot([r["step"] for r in log], best, label=name)
    fig.axes[1].plot([r["step"] for r in log], [r["loss_repeat"] for r in log], label=name)
  fig.axes[0].set(xlabel="step", ylabel="max prefix-matching score")
  fig.axes[1].set(xlabel="step", ylabel="loss on repeats ≥ 2")
  fig.axes[0].legend(fontsize=7)
  chance = float(np.log(config.data.vocab_size - 1))
  lines = [
    "# F5 induction heads (Olsson et al. 2022): repeated random tokens",
    "",
    f"`configs/icl/induction.py:{size}`, {steps} steps, seed {args.seed}; scores on one eval"
    f" batch every {every} steps; chance loss log(V − 1) = {chance:.2f}.",
    "",
    "| model | final loss (repeat 1) | final loss (repeats ≥ 2) | max prefix score (last layer) |"
    " max previous-token score (layer 1) | first step with prefix score > 0.3 |",
    "|---|---|---|---|---|---|",
  ]
  for name, entry in logs.items():
    last, log = entry["log"][-1], entry["log"]
    rise = next((r["step"] for r in log if max(r["prefix"][-1]) > 0.3), None)
    lines.append(
      f"| {name} | {last['loss_first']:.3f} | {last['loss_repeat']:.3f} |"
      f" {max(last['prefix'][-1]):.3f} | {max(last['previous'][0]):.3f} | {rise} |"
    )
  two, one = logs["attention-2L"]["log"][-1], logs["attention-1L"]["log"][-1]
  checks = {
    "2-layer attention learns induction (loss on repeats < 0.3 × chance, prefix score > 0.5)": (
      two["loss_repeat"] < 0.3 * chance and max(two["prefix"][-1]) > 0.5
    ),
    "1-layer attention does not (loss on repeats > 0.7 × chance)": one["loss_repeat"]
    > 0.7 * chance,
  }
  lines += [
    "",
    "Paper: induction heads need 2 layers and appear as a phase change (a sudden drop of the"
    " repeat loss with the rise of the prefix-matching score).",
    "",
    *[f"F5 {'PASS' if ok else 'FAIL'}: {what}." for what, ok in checks.items()],
  ]
  write(out, "f5", lines, logs, fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("figure", choices=("f1", "f2", "f3", "f4", "f5"))
  parser.add_argument("--tiny", action="store_true", help="a seconds-long CPU smoke setting")
  parser.add_argument("--families", action="store_true", help="f1: the per-mixer table instead")
  parser.add_argument("--workers", type=int, default=1, help="f1 --families: mixers at once")
  parser.add_argument("--steps", type=int, default=0, help="training steps (0: the default)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  args.out = REPO / "experiments/results/icl" / ("tiny" if args.tiny else "")
  {"f1": f1, "f2": f2, "f3": f3, "f4": f4, "f5": f5}[args.figure](args)


if __name__ == "__main__":
  main()
