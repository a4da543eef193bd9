"""Examples of a prepared TFDS dataset, read through `tfds.data_source` (ArrayRecord random
access: TensorFlow is not needed to read, only to build most datasets).

A task's `data.source` names one as "tfds:<name>" (e.g. "tfds:lm1b", "tfds:imdb_reviews");
`data.tfds_data_dir` ("" = TFDS's default, ~/tensorflow_datasets) says where it was prepared.
Preparing is the user's one-time step (these machines have no internet); a dataset that is not
prepared, or tensorflow-datasets not installed, is one error line saying what to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnzoo.config import ConfigError

PREFIX = "tfds:"


def is_tfds(source: str) -> bool:
  return isinstance(source, str) and source.startswith(PREFIX)


def tfds_split(source: str, split: str, data_dir: str | None = None) -> Sequence[dict]:
  """The examples of split `split` of the dataset "tfds:<name>" (a random-access sequence of
  feature dicts: text as str, images as uint8 arrays, labels as integer arrays)."""
  name = source[len(PREFIX) :]
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ConfigError(
      f"data.source {source!r} needs tensorflow-datasets: pip install -e '.[tfds]'"
    ) from None
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # not registered, not prepared, or prepared as TFRecord only
    where = f" in {data_dir}" if data_dir else ""
    raise ConfigError(
      f"TFDS dataset {name!r} (split {split!r}) is not readable{where}: prepare it once with "
      f"`tfds build {name} --file_format=array_record"
      + (f" --data_dir={data_dir}`" if data_dir else "`")
      + f" ({str(e).splitlines()[0][:120]})"
    ) from None


def tfds_first_split(source: str, splits: Sequence[str], data_dir: str | None = None):
  """(name, examples) of the first of `splits` the dataset has (e.g. "validation", then
  "test" for lm1b, which has no validation split)."""
  for split in splits[:-1]:
    try:
      return split, tfds_split(source, split, data_dir)
    except ConfigError:
      continue
  return splits[-1], tfds_split(source, splits[-1], data_dir)
