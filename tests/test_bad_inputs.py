"""Bad input, as a new user would type it: every mistake in a config, on the command line or in
the data settings is one `error:` line on stderr and exit status 2, before any training."""

import pytest

from attnzoo.cli import main
from tests.conftest import REPO

MQAR = f"{REPO}/configs/mqar.py"
LM = f"{REPO}/configs/lm.py:d_model=16,num_layers=1,seq_len=32,batch_size=8,num_steps=2"
SMALL = "seq_len=32,num_kv_pairs=4,train_examples=256,batch_size=32,num_steps=5"


def train(knobs="", *overrides):
  spec = f"{MQAR}:{','.join(filter(None, [SMALL, knobs]))}"
  return [
    "train",
    "--config",
    spec,
    "--quiet",
    "--config.data.vocab_size=128",
    "--config.data.test_segments=((32,4,32,32),)",
    *overrides,
  ]


CASES = [
  # model options
  (train("d_model=-5"), "error: d_model must be a positive integer, got -5"),
  (train("d_model=0"), "error: d_model must be a positive integer, got 0"),
  (train("num_layers=0"), "error: num_layers must be a positive integer, got 0"),
  (train("num_heads=3"), "error: d_model (64) must be divisible by num_heads (3)"),
  (train("mixer=nsa,stride=3"), "error: nsa: stride (3) must divide block_cmp (32)"),
  (train("mixer=nope"), "error: unknown mixer 'nope'"),
  (train("mixer=fnet"), "error: mixer 'fnet' is bidirectional-only (no causal form)"),
  (
    train("mixer=attention,sink_tokens=2"),
    "error: sink_tokens (2) must be >= 0 and needs a window",
  ),
  (train("mixer=moh,routed_heads=4"), "error: moh needs 0 <= shared_heads and 0 <= routed_heads"),
  (train("", "--config.model.state_mixer=moe"), "error: unknown state_mixer 'moe'"),
  (train("", "--config.model.norm=batchnorm"), "error: unknown norm 'batchnorm'"),
  (train("", "--config.model.position_embedding=rope"), "error: unknown position_embedding 'rope'"),
  (
    train("", "--config.model.residual_dropout=1.5"),
    "error: residual_dropout must be in [0, 1), got 1.5",
  ),
  (
    train("", "--config.model.max_positions=16"),
    "error: a sequence of 32 tokens is longer than the 16 positions",
  ),
  # training options
  (train("num_steps=-1"), "error: train.num_steps must be a positive integer, got -1"),
  (train("num_steps=0"), "error: train.num_steps must be a positive integer, got 0"),
  (train("lr=-0.001"), "error: train.lr must be positive, got -0.001"),
  (train("", "--config.train.log_every=0"), "error: train.log_every must be a positive integer"),
  (
    train("", "--config.train.checkpoint_every=75"),
    "error: train.checkpoint_every must be a multiple of train.log_every (50)",
  ),
  (train("", "--config.train.weight_decay=-0.1"), "error: train.weight_decay must be >= 0"),
  (train("", "--config.train.b2=1.0"), "error: train.b2 must be in [0, 1)"),
  (train("dtype=float8"), "error: train.compute_dtype must be auto, float32, bfloat16"),
  (train("", "--config.train.lr_step_every=0"), "error: train.lr_step_every must be >= 1"),
  (
    ["train", "--config", f"{MQAR}:preset=zoology", "--quiet"],
    "error: preset=zoology trains one length per run: give seq_len",
  ),
  (["train", "--config", f"{MQAR}:preset=big"], "error: unknown preset 'big'"),
  (train("", "--config.train.grad_accum=0"), "error: train.grad_accum must be a positive integer"),
  # mesh (one CPU device here)
  (train("", "--config.mesh.context=2"), "error: mesh {'data': -1, 'fsdp': 1, 'context': 2, 'tens"),
  (train("", "--config.mesh.fsdp=-1"), "error: at most one mesh axis may be -1"),
  (
    train("", "--config.mesh.context_parallel.state=chain"),
    "error: mesh.context_parallel.state must be one of ('allgather', 'logscan'), got 'chain'",
  ),
  # config keys, values and arguments
  (train("foo=1"), "error: unknown knob 'foo'"),
  (train("lr"), "error: config argument 'lr' is not of the form key=value"),
  (train("", "--config.train.lrr=1"), "error: unknown config key 'train.lrr'"),
  (train("", "--config.train.lr=abc"), "error: config key 'train.lr' wants float"),
  (
    train("", "--config.data.random_non_queries=1"),
    "error: config key 'data.random_non_queries' wants bool",
  ),
  (train("", "--lr=1"), "error: unrecognised argument '--lr=1'"),
  (
    ["train", "--config", f"{REPO}/configs/nope.py"],
    f"error: config file '{REPO}/configs/nope.py' does not exist",
  ),
  (["sweep", "--config", MQAR], "error: a sweep config must return a list of configs"),
  (["bench", "nope"], "error: unknown benchmark 'nope'"),
  (["demo", "--mixers", "nope"], "error: unknown mixer 'nope'"),
  # data settings
  (train("seq_len=31"), "error: MQAR seq_len must be even, got 31"),
  (train("num_kv_pairs=20"), "error: MQAR num_kv_pairs=20 does not fit seq_len=32"),
  (train("", "--config.data.vocab_size=16"), "error: MQAR vocab_size (16) must exceed seq_len"),
  (train("train_examples=16"), "error: MQAR segment L32_kv4: batch_size 32 > num_examples 16"),
  (
    train("", "--config.data.test_segments=((32,4),)"),
    "error: data.test_segments must be a non-empty list of (seq_len, num_kv_pairs",
  ),
  (train("", "--config.data.power_a=0.0"), "error: data.power_a must be positive, got 0.0"),
  (
    ["train", "--config", f"{MQAR}:seq_len=64"],
    "error: give both seq_len and num_kv_pairs, or neither",
  ),
  # language modeling (configs/lm.py) and generation
  (["train", "--config", f"{LM},source=/no/such.txt"], "error: data.source '/no/such.txt' does"),
  (["train", "--config", f"{LM},source="], "error: data.source is empty"),
  (["train", "--config", f"{LM},tokenizer=word"], "error: data.tokenizer must be char or byte"),
  (["train", "--config", f"{LM},seq_len=2000000"], "error: the training split has 1003854 tok"),
  (
    ["train", "--config", LM, "--config.model.max_positions=16"],
    "error: a sequence of 32 tokens is longer than the 16 positions",
  ),
  (["generate", "--workdir", "w", "--max_new_tokens", "0"], "error: max_new_tokens must be >= 1"),
  # in-context learning
  (
    ["train", "--config", f"{REPO}/configs/icl/icl.py:function=cubic", "--quiet"],
    "error: unknown function class 'cubic'",
  ),
  (
    ["train", "--config", f"{REPO}/configs/icl/icl.py:format=grid", "--quiet"],
    "error: unknown prompt format 'grid'",
  ),
  # LRA data
  (["data", "prepare", "lra/nope", "--out", "/tmp/x"], "error: unknown dataset 'lra/nope'"),
  (
    ["train", "--config", f"{REPO}/configs/lra/listops.py:data_dir=/nonexistent/lo,d_model=16"],
    "error: no prepared lra/listops data in '/nonexistent/lo'; run: attnzoo data prepare",
  ),
  (
    ["train", "--config", f"{REPO}/configs/lra/pathfinder.py:resolution=64"],
    "error: Pathfinder resolution must be 32 or 128, got 64",
  ),
  (
    ["train", "--config", f"{REPO}/configs/lra/listops.py:setting=big"],
    "error: unknown setting 'big' for lra/listops; use lra or s4",
  ),
  (
    ["train", "--config", f"{REPO}/configs/lra/text.py:d_model=16"],
    "error: lra/text needs its dataset: download aclImdb_v1.tar.gz",
  ),
  (
    ["data", "prepare", "lra/image", "--out", "/tmp/x", "--config.data.source=/nonexistent"],
    "error: a CIFAR-10 batch not found at '/nonexistent/data_batch_1'",
  ),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[m[7:40] for _, m in CASES])
def test_one_error_line_and_status_2(argv, message, tmp_path, capsys):
  if argv[0] in ("train", "sweep", "demo"):
    argv = [*argv, "--workdir", str(tmp_path / "w")]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(message), err
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_eval_of_a_workdir_without_a_run(tmp_path, capsys):
  assert main(["eval", "--workdir", str(tmp_path)]) == 2
  assert (
    capsys.readouterr().err.strip() == f"error: {str(tmp_path)!r} holds no run (no config.json)"
  )


def test_config_file_without_get_config(tmp_path, capsys):
  file = tmp_path / "cfg.py"
  file.write_text("x = 1\n")
  assert main(["train", "--config", str(file), "--workdir", str(tmp_path / "w")]) == 2
  assert (
    capsys.readouterr().err.strip() == f"error: config file {str(file)!r} has no get_config(arg)"
  )


def test_unwritable_workdir(tmp_path, capsys):
  blocked = tmp_path / "file"
  blocked.write_text("")
  assert main(["train", "--workdir", str(blocked / "w"), "--config", MQAR]) == 2
  assert capsys.readouterr().err.startswith("error: cannot write to workdir")
