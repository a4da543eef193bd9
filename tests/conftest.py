"""Shared test helpers: small configs and relative-error checks."""

import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# One persistent XLA compilation cache per checkout, shared by the test workers and the training
# subprocesses they start (set before jax is imported): identical programs — the same tiny model
# in several tests, a run and its resumption — compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The suite is bound by compilation: XLA's CPU backend without its expensive optimisation
# passes compiles about twice as fast (decode == forward over every mixer, cold: 108 s -> 52 s)
# and computes the same numbers to the tolerances the tests check. Subprocesses that set their
# own XLA_FLAGS (forced device counts) append these.
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA_FLAGS}".strip()

# Further cases of what the default suite already covers once (more TPU-interpret variants):
# run with ATTNZOO_SLOW_TESTS=1; skipped otherwise, to keep `make test` inside its budget.
slow = pytest.mark.skipif(
  os.environ.get("ATTNZOO_SLOW_TESTS") != "1", reason="opt-in slow case: set ATTNZOO_SLOW_TESTS=1"
)


def relative_error(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def decode_in_chunks(mixer, variables, x, stops, key=0):
  """Decodes x through the mixer's cache from empty, in chunks ending at `stops` (each chunk
  with its positions): (the outputs concatenated [B,T,...], the cache after each chunk)."""
  import functools

  import jax
  import jax.numpy as jnp

  cache = jax.jit(functools.partial(mixer.init, decode=True))(jax.random.key(key), x)["cache"]
  step = jax.jit(functools.partial(mixer.apply, decode=True, mutable=["cache"]))
  outs, caches, start = [], [], 0
  for stop in stops:
    positions = jnp.broadcast_to(jnp.arange(start, stop), (x.shape[0], stop - start))
    out, new = step({**variables, "cache": cache}, x[:, start:stop], positions=positions)
    cache, start = new["cache"], stop
    outs.append(out)
    caches.append(cache)
  return jnp.concatenate(outs, axis=1), caches


def tiny_mqar_config(**overrides):
  """A seconds-long MQAR run: small vocab, short sequences, frequent logs/checkpoints."""
  from attnzoo.config import load_config_file, set_typed  # needs ml_collections

  config = load_config_file(
    f"{REPO}/configs/mqar.py:mixer=attention,d_model=32,num_layers=2,seq_len=32,"
    "num_kv_pairs=4,train_examples=2048,batch_size=32,num_steps=40"
  )
  for key, value in {
    "data.vocab_size": 256,
    "data.test_segments": ((32, 4, 64, 32),),
    "train.log_every": 5,
    "train.eval_every": 20,
    "train.checkpoint_every": 10,
    "train.warmup_steps": 5,
    **overrides,
  }.items():
    set_typed(config, key, value)
  return config


@pytest.fixture
def rng():
  return np.random.default_rng(0)
