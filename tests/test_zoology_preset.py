"""`configs/mqar.py:preset=zoology` expresses Zoology Figure 2's protocol, one test per item;
the defaults stay as they were."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.config import ConfigError, load_config_file
from attnzoo.models.backbone import Block
from attnzoo.tasks.mqar import MQAR
from attnzoo.train.optim import decay_mask, learning_rate_schedule, make_optimizer
from tests.conftest import REPO

MQAR_FILE = f"{REPO}/configs/mqar.py"


def zoology(**knobs):
  arg = ",".join(f"{k}={v}" for k, v in {"preset": "zoology", "seq_len": 64, **knobs}.items())
  return load_config_file(f"{MQAR_FILE}:{arg}")


def test_filler_is_token_zero():
  c = zoology(train_examples=512, test_examples=64)
  assert c.data.random_non_queries is False
  inputs, _ = MQAR.from_config(c).train_data[0]
  assert ((inputs[:, 2 * 4 :] != 0).sum(1) == 4).all()  # only the 4 query keys are non-zero


@pytest.mark.parametrize("L,K,batch", [(64, 4, 512), (128, 8, 512), (256, 16, 256), (512, 64, 128)])
def test_one_length_per_run_with_its_pairs_examples_and_batch(L, K, batch):
  c = zoology(seq_len=L)
  assert c.data.train_segments == ((L, K, 100_000, batch),)
  assert c.data.test_segments == ((L, K, 3_000, batch),)


def test_batches_in_fixed_order_every_epoch():
  c = zoology(train_examples=2048, test_examples=64)
  task = MQAR.from_config(c)
  assert c.data.shuffle is False and task.steps_per_epoch == 4
  inputs, _ = task.train_data[0]
  np.testing.assert_array_equal(task.train_batch(1)["inputs"], inputs[512:1024])
  np.testing.assert_array_equal(task.train_batch(5)["inputs"], task.train_batch(1)["inputs"])


def test_adamw_betas_and_weight_decay_on_every_parameter_without_clipping():
  t = zoology().train
  assert (t.b1, t.b2, t.weight_decay, t.decay_all_params) == (0.9, 0.999, 0.1, True)
  assert not t.grad_clip
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": 1.0}}
  assert all(jax.tree.leaves(decay_mask(params, t.decay_all_params)))
  # No clipping: beside a huge gradient, a small one still takes the full AdamW step
  # (m/(sqrt(v)+eps) = 1 at step 1; clipped to norm 1 it would be ~5e-10/(5e-10+1e-8)).
  opt = make_optimizer(t, t.num_steps)
  grads = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
  grads["dense"]["bias"] = 1e-3 * jnp.ones(2)
  updates, _ = opt.update(grads, opt.init(params), params)
  step = -t.lr * (1 + t.weight_decay)  # lr at step 0: no warm-up
  np.testing.assert_allclose(updates["dense"]["bias"], step, rtol=1e-4)


def test_cosine_stepped_per_epoch_without_warmup_over_64_epochs():
  t = zoology(lr=0.01).train
  epoch = 100_000 // 512
  assert t.num_steps == 64 * epoch and t.lr_step_every == epoch and t.warmup_steps == 0
  schedule = learning_rate_schedule(t, t.num_steps)
  for e in (0, 1, 17, 63):  # PyTorch CosineAnnealingLR(T_max=64, eta_min=0) at epoch e
    want = 0.01 * (1 + math.cos(math.pi * e / 64)) / 2
    for step in (e * epoch, e * epoch + epoch - 1):
      assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_evaluated_every_epoch_and_stops_once_above_099():
  t = zoology().train
  assert t.eval_every == 100_000 // 512
  assert t.early_stop_at > 0.99 and np.nextafter(t.early_stop_at, 0) <= 0.99  # "> 0.99"


def test_float32_and_dropout():
  c = zoology(mixer="attention")
  assert c.train.compute_dtype == "float32"
  assert c.model.embedding_dropout == 0.1 and c.model.residual_dropout == 0.0
  assert c.model.mixer_kwargs.attention_dropout == 0.1


def test_attention_has_one_head_and_learned_positions_others_none():
  c = zoology(mixer="attention", seq_len=256)
  assert c.model.mixer_kwargs.num_heads == 1
  assert (c.model.position_embedding, c.model.max_positions) == ("learned", 256)
  assert zoology(mixer="hyena").model.position_embedding == "none"


def test_figure2_mixers():
  c = zoology(mixer="base_conv+based", seq_len=128)
  assert c.model.mixer_kwargs.based.feature_dim == 8
  assert c.model.mixer_kwargs.based.num_heads == 1
  assert c.model.mixer_kwargs.base_conv.kernel_size == 3
  assert zoology(mixer="base_conv").model.mixer_kwargs.layer_kernel_sizes == (3, -1)
  h3 = zoology(mixer="h3", seq_len=256).model.mixer_kwargs
  assert (h3.d_state, h3.head_dim) == (256, 2)
  assert zoology(mixer="hyena", seq_len=128).model.mixer_kwargs.l_max == 128
  mamba = zoology(mixer="mamba").model  # Zoology's MambaBlock
  assert (mamba.norm, mamba.state_mixer, mamba.embedding_dropout) == ("rmsnorm", "identity", 0.0)


def test_identity_state_mixer_adds_the_normed_stream_back():
  assert zoology(mixer="hyena").model.state_mixer == "identity_norm"
  x = jax.random.normal(jax.random.key(0), (2, 13, 16))
  kw = dict(
    mixer="attention",
    mixer_kwargs={"implementation": "xla"},
    d_model=16,
    layer_idx=0,
    num_layers=2,
    mlp_hidden=64,
    norm="layernorm",
    dtype=jnp.float32,
  )
  call = dict(positions=None, segment_ids=None, block_ids=None, decode=False)
  quirk = Block(state_mixer="identity_norm", **kw)
  params = quirk.init(jax.random.key(1), x, **call)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  plain = {"params": {k: v for k, v in params["params"].items() if k != "LayerNorm_1"}}
  y = Block(state_mixer="identity", **kw).apply(plain, x, **call)
  norm2 = nn.LayerNorm().apply({"params": params["params"]["LayerNorm_1"]}, y)
  np.testing.assert_allclose(quirk.apply(params, x, **call), y + norm2, rtol=1e-6, atol=1e-6)


def test_defaults_stay_and_bad_preset_arguments_are_errors():
  c = load_config_file(MQAR_FILE)
  assert c.data.random_non_queries is True and c.data.shuffle is True
  assert (c.model.state_mixer, c.train.lr_step_every, c.train.b2) == ("identity", 1, 0.98)
  for arg, message in [
    ("preset=big", "unknown preset 'big'"),
    ("preset=zoology", "give seq_len"),
    ("preset=zoology,seq_len=96", "no num_kv_pairs for seq_len=96"),
    ("epochs=3", "unknown knob 'epochs'"),
  ]:
    with pytest.raises(ConfigError, match=message):
      load_config_file(f"{MQAR_FILE}:{arg}")


def test_based_preset_is_the_based_papers_mixed_lengths():
  c = load_config_file(f"{MQAR_FILE}:preset=based,mixer=h3,d_model=128")
  assert c.data.train_segments[0] == (64, 4, 100_000, 256)
  assert [s[:3] for s in c.data.train_segments[1:]] == [
    (128, 8, 20_000),
    (256, 16, 20_000),
    (256, 32, 20_000),
    (256, 64, 20_000),
  ]
  assert [s[:2] for s in c.data.test_segments][-1] == (1024, 256)
  assert {s[2:] for s in c.data.test_segments} == {(1_000, 32)}
  assert c.data.random_non_queries is True and c.data.shuffle is False
  assert c.train.num_steps == 32 * (100_000 // 256 + 4 * (20_000 // 256))
  assert c.model.mixer_kwargs.d_state == 32 and c.model.max_positions == 1024
