"""experiments/zoology_fig2.py on a 2-cell grid on the CPU: cells, table, figure, resuming."""

import importlib.util
import json

import pytest

from tests.conftest import REPO


def load_script():
  spec = importlib.util.spec_from_file_location(
    "zoology_fig2", REPO / "experiments/zoology_fig2.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_two_cells_table_figure_and_resume(tmp_path, monkeypatch):
  fig2 = load_script()
  args = [
    *("--L", "16", "--d", "16", "--mixers", "attention,base_conv", "--lrs", "1e-2,1e-3"),
    *("--epochs", "1", "--train_examples", "128", "--test_examples", "32", "--batch_size", "32"),
    *("--vocab_size", "64", "--num_kv_pairs", "2"),
    *("--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "runs")),
  ]
  assert fig2.main(args) == 0
  cells = json.loads((tmp_path / "out/cells.json").read_text())
  assert set(cells) == {"L16_d16_attention", "L16_d16_base_conv"}
  for cell in cells.values():  # the best of the two learning rates, 4 steps each
    assert cell["accuracy"] == max(cell["per_lr"].values())
    assert set(cell["steps"].values()) == {4} and cell["protocol"]["epochs"] == 1
  table = (tmp_path / "out/figure2.md").read_text()
  assert "| 16 | attention |" in table and "| 16 | base_conv |" in table
  assert (tmp_path / "out/figure2.png").stat().st_size > 10_000
  # Resuming: recorded cells are not run again.
  monkeypatch.setattr(fig2, "run_cell", lambda *a: pytest.fail("a recorded cell was re-run"))
  assert fig2.main(args) == 0
  assert json.loads((tmp_path / "out/cells.json").read_text()) == cells


def test_agreement_checks_against_the_paper():
  fig2 = load_script()
  cell = lambda L, d, m, acc: {"L": L, "d": d, "mixer": m, "accuracy": acc}
  cells = {
    fig2.cell_key(512, 512, m): cell(512, 512, m, acc)
    for m, acc in [
      ("attention", 1.0),
      ("base_conv", 0.75),
      ("rwkv4", 0.3),
      ("hyena", 0.2),
      ("h3", 0.1),
    ]
  }
  cells["L64_d64_hyena"] = cell(64, 64, "hyena", 0.9)  # paper 0.52
  lines = "\n".join(fig2.agreement(cells))
  assert "attention >= 0.99: 1 of 1" in lines
  assert "4 of 5 cells (80 %" in lines
  assert ": kept" in lines
  assert "L=64 d=64 hyena: 0.90 vs 0.52" in lines
