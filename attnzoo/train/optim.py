"""AdamW with a weight-decay mask, linear warm-up + cosine decay (per step or per epoch),
global-norm clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(cfg, num_steps: int):
  """Linear warm-up then cosine to lr * min_lr_ratio. With lr_step_every = E > 1 the schedule
  moves once every E steps (E = the steps of an epoch: PyTorch's CosineAnnealingLR stepped per
  epoch, as Zoology does), over ceil(num_steps / E) such units, warm-up counted in units."""
  every = getattr(cfg, "lr_step_every", 1)
  units = -(-num_steps // every)
  warmup = min(cfg.warmup_steps, max(units - 1, 0))
  # optax.warmup_cosine_decay_schedule's pieces, joined here so that lr may be a traced
  # per-run value (packed sweeps); the same float operations as that function.
  lr = cfg.lr
  alpha = (lr * cfg.min_lr_ratio) / lr if isinstance(lr, (int, float)) else cfg.min_lr_ratio
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(init_value=0.0, end_value=lr, transition_steps=warmup),
      optax.cosine_decay_schedule(
        init_value=lr, decay_steps=max(units, warmup + 1) - warmup, alpha=alpha
      ),
    ],
    [warmup],
  )
  return schedule if every == 1 else lambda step: schedule(step // every)


def decay_mask(params, decay_all: bool):
  """Weight decay by parameter role, read from the name: a leaf named "kernel" (projections,
  convolutions) or "embedding" decays; nothing else does (biases, norm scales, decay rates,
  per-channel gates and bonuses, token-shift mixes, the LoRAs that produce RWKV's decays and
  mixes: mixers name these otherwise). decay_all decays everything (as Zoology does)."""

  def decays(path, _):
    names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
    return decay_all or names[-1] in ("kernel", "embedding")

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(
    learning_rate_schedule(cfg, num_steps),
    b1=cfg.b1,
    b2=cfg.b2,
    weight_decay=cfg.weight_decay,
    mask=lambda params: decay_mask(params, cfg.decay_all_params),
  )
  if cfg.grad_clip:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw
