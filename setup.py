from setuptools import find_packages, setup

setup(
  name="attnzoo",
  version="0.1.0",
  description="Every family of attention and attention replacement in JAX, with Pallas kernels.",
  python_requires=">=3.11",
  packages=find_packages(include=["attnzoo*", "pallas_kernels*"]),
  package_data={"attnzoo": ["data/tinyshakespeare.txt"]},
  install_requires=[
    "jax==0.11.2",
    "jaxlib==0.11.2",
    "flax",
    "optax",
    "orbax-checkpoint",
    "chex",
    "ml-collections",
    "absl-py",
    "tensorboardX",
    "tqdm",
    "numpy",
    "matplotlib",
    "einops",
  ],
  extras_require={"tfds": ["tensorflow-datasets", "tensorflow-cpu"]},
  entry_points={"console_scripts": ["attnzoo=attnzoo.cli:run"]},
)
