"""AdamW with a weight-decay mask, linear warm-up + cosine decay, global-norm clipping."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(cfg, num_steps: int):
  warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params, decay_all: bool):
  """Decay matrices and embeddings; leave biases and norm scales alone (unless decay_all)."""
  return jax.tree.map(lambda p: decay_all or p.ndim >= 2, params)


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2,
                      weight_decay=cfg.weight_decay,
                      mask=lambda params: decay_mask(params, cfg.decay_all_params))
  if cfg.grad_clip:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw
