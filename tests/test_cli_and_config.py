"""Configs and the command line: strict keys and types, one-line errors, eval, sweep."""

import json
import subprocess
import sys

import pytest

from attnzoo.cli import main
from attnzoo.config import ConfigError, load_config_file, set_typed
from tests.conftest import REPO

MQAR = f"{REPO}/configs/mqar.py"


def test_arg_knobs_and_mixer_options():
  c = load_config_file(f"{MQAR}:mixer=sliding_window,window=16,d_model=128,num_heads=2,lr=1e-3")
  assert c.model.mixer == "sliding_window" and c.model.d_model == 128
  assert c.model.mixer_kwargs.window == 16 and c.model.mixer_kwargs.num_heads == 2
  assert c.train.lr == 1e-3 and c.data.vocab_size == 8192
  hybrid = load_config_file(f"{MQAR}:mixer=attention+sliding_window")
  assert set(hybrid.model.mixer_kwargs) == {"attention", "sliding_window"}


@pytest.mark.parametrize(
  "spec,message",
  [
    ("foo=1", "unknown knob 'foo'"),
    ("mixer=nope", "unknown mixer 'nope'"),
    ("seq_len=64", "give both seq_len and num_kv_pairs"),
    ("lr", "not of the form key=value"),
  ],
)
def test_bad_arguments(spec, message):
  with pytest.raises(ConfigError, match=message):
    load_config_file(f"{MQAR}:{spec}")


def test_overrides_are_typed_and_strict():
  c = load_config_file(MQAR)
  set_typed(c, "train.lr", 1)  # an int where a float is wanted is fine
  assert c.train.lr == 1.0
  with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
    set_typed(c, "train.nope", 1)
  with pytest.raises(ConfigError, match="unknown config key 'nope'"):
    set_typed(c, "nope.lr", 1)
  with pytest.raises(ConfigError, match="'train.num_steps' wants int"):
    set_typed(c, "train.num_steps", "many")
  with pytest.raises(ConfigError, match="wants bool"):
    set_typed(c, "data.random_non_queries", 1)


def test_python_m_train_then_eval(tmp_path):
  workdir = tmp_path / "run"
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "attnzoo", *a], check=True, capture_output=True, text=True
  )
  run(
    "train",
    "--workdir",
    str(workdir),
    "--quiet",
    "--config",
    f"{MQAR}:d_model=32,seq_len=32,num_kv_pairs=4,train_examples=512,batch_size=32,num_steps=20",
    "--config.data.vocab_size=128",
    "--config.data.test_segments=((32,4,64,32),)",
  )
  out = json.loads(run("eval", "--workdir", str(workdir)).stdout)
  summary = json.loads((workdir / "summary.json").read_text())
  assert out["step"] == 20 and out["eval/accuracy"] == pytest.approx(summary["eval/accuracy"])


def test_sweep_reports_best_learning_rate(tmp_path, capsys):
  spec = (
    f"{REPO}/configs/sweeps/mqar_lr.py:mixers=attention,d_models=32,lrs=1e-4;3e-3,"
    "seq_len=32,num_kv_pairs=4,train_examples=512,batch_size=32,num_steps=30"
  )
  assert (
    main(
      [
        "sweep",
        "--config",
        spec,
        "--workdir",
        str(tmp_path),
        "--quiet",
        "--config.data.vocab_size=128",
        "--config.data.test_segments=((32,4,64,32),)",
      ]
    )
    == 0
  )
  best = json.loads((tmp_path / "best.json").read_text())
  runs = {
    p.name: json.loads((p / "summary.json").read_text()) for p in tmp_path.iterdir() if p.is_dir()
  }
  assert len(runs) == 2
  top = max(runs, key=lambda n: runs[n]["eval/accuracy"])
  assert best["attention_d32"]["run"] == top
  assert "best over learning rates" in capsys.readouterr().out
