"""Import rules of DESIGN.md (Layers), read from the source with ast (nothing is imported):
imports flow down ops <- mixers <- models <- tasks <- train <- cli; a mixer module imports only
`registry` and the plumbing module `layers` within mixers/; pallas_kernels/ imports nothing
from attnzoo."""

from __future__ import annotations

import ast
from collections.abc import Iterator

import pytest

from tests.conftest import REPO

LAYERS = ("ops", "mixers", "models", "tasks", "train", "cli")  # each imports only earlier ones
MIXER_PLUMBING = {"attnzoo.mixers.registry", "attnzoo.mixers.layers"}


def module_name(path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
  path = REPO.joinpath(*name.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(source: str, module: str, is_package: bool) -> Iterator[str]:
  """The modules a file imports anywhere in it (relative imports resolved; `from a import b`
  names a.b where that is a module, else a)."""
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module
      if node.level:
        package = module.split(".")[: len(module.split(".")) - node.level + is_package]
        base = ".".join(package + ([node.module] if node.module else []))
      for alias in node.names:
        yield f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base


def layer(name: str) -> str | None:
  parts = name.split(".")
  if parts[0] == "attnzoo" and len(parts) > 1 and parts[1] in LAYERS:
    return parts[1]
  return None


def violations(module: str, imported: list[str]) -> list[str]:
  found = []
  for name in imported:
    if module.startswith("pallas_kernels") and name.split(".")[0] == "attnzoo":
      found.append(f"{module} imports {name}: pallas_kernels imports nothing from attnzoo")
    mine, theirs = layer(module), layer(name)
    if mine and theirs and LAYERS.index(theirs) > LAYERS.index(mine):
      found.append(f"{module} imports {name}: {mine} never imports {theirs}")
    if mine == theirs == "mixers" and module != "attnzoo.mixers" and name not in MIXER_PLUMBING:
      found.append(
        f"{module} imports {name}: a mixer module imports only "
        f"{' and '.join(sorted(MIXER_PLUMBING))} within mixers/"
      )
  return found


def check(path) -> list[str]:
  module = module_name(path)
  return violations(module, list(imports(path.read_text(), module, path.name == "__init__.py")))


def test_the_tree_follows_the_import_rules():
  files = sorted([*REPO.glob("attnzoo/**/*.py"), *REPO.glob("pallas_kernels/**/*.py")])
  assert len(files) > 20
  assert [v for path in files for v in check(path)] == []


@pytest.mark.parametrize(
  "module,source,broken",
  [
    ("attnzoo.mixers.new", "from attnzoo.mixers.gla import GLA", True),
    ("attnzoo.mixers.new", "from .gla import GLA", True),
    ("attnzoo.mixers.new", "from attnzoo.mixers import MIXERS", True),
    ("attnzoo.mixers.new", "from attnzoo.mixers import layers, registry", False),
    (
      "attnzoo.mixers.new",
      "from attnzoo.mixers.layers import ShortConv\nfrom attnzoo.ops import softmax_attention",
      False,
    ),
    ("attnzoo.mixers", "from attnzoo.mixers import gla", False),
    ("attnzoo.ops.new", "def f():\n  from attnzoo.mixers.layers import ShortConv", True),
    ("attnzoo.mixers.new", "import attnzoo.models.lm", True),
    ("attnzoo.models.new", "from attnzoo.tasks import mqar", True),
    ("attnzoo.tasks.new", "from attnzoo.train import trainer", True),
    ("attnzoo.train.new", "from attnzoo import cli", True),
    ("attnzoo.train.new", "from attnzoo.models import lm", False),
    ("pallas_kernels.new", "from attnzoo.ops.segments import EMPTY", True),
    ("pallas_kernels.new", "from pallas_kernels.common import EMPTY", False),
  ],
)
def test_the_rules_catch_violations(module, source, broken):
  assert bool(violations(module, list(imports(source, module, False)))) == broken
