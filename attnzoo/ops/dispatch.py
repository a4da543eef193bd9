"""Choosing an implementation for an op: one registry per op, the same rules for every op.

An op registers implementations by name ("xla", "pallas", "interpret", "cudnn", ...). Each
has a `supports(**arguments) -> reason | None` check that runs before tracing. A forced
implementation that cannot serve the arguments raises `Unsupported` naming the reason; "auto"
takes the first implementation in the backend's preference order that can serve them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax

from pallas_kernels.common import device_reason


class Unsupported(NotImplementedError):
  """An implementation cannot serve the given arguments (raised before tracing)."""


@dataclasses.dataclass(frozen=True)
class Implementation:
  fn: Callable
  supports: Callable[..., str | None]


def _always(**_):
  return None


class Dispatcher:
  """Registry of implementations for one op.

  auto_order maps a backend name ("cpu", "gpu", "tpu") to the implementation names "auto"
  tries, in order; the key "default" serves any other backend.
  """

  def __init__(self, op_name: str, auto_order: dict[str, tuple[str, ...]]):
    self.op_name = op_name
    self.auto_order = auto_order
    self.implementations: dict[str, Implementation] = {}

  def register(self, name: str, supports: Callable[..., str | None] = _always):
    def decorator(fn):
      self.implementations[name] = Implementation(fn, supports)
      return fn

    return decorator

  def register_kernel(self, run: Callable, reason: Callable[..., str | None], kernels: str):
    """Registers a Pallas kernel twice: "pallas" (compiled, on a GPU or TPU) and "interpret"
    (Pallas interpret mode, any backend). run(**arguments, interpret=bool) calls it;
    reason(**arguments, interpret=bool) says why it cannot serve the arguments, or None;
    `kernels` names them in the device check's message."""
    compiled = lambda **a: device_reason(kernels) or reason(**a, interpret=False)
    self.register("pallas", supports=compiled)(functools.partial(run, interpret=False))
    self.register("interpret", supports=functools.partial(reason, interpret=True))(
      functools.partial(run, interpret=True)
    )

  def reason(self, name: str, **arguments) -> str | None:
    """Why implementation `name` cannot serve `arguments`, or None when it can."""
    if name not in self.implementations:
      return f"unknown implementation {name!r}; known: {sorted(self.implementations)}"
    return self.implementations[name].supports(**arguments)

  def choose(self, implementation: str, **arguments) -> str:
    if implementation != "auto":
      why = self.reason(implementation, **arguments)
      if why is not None:
        raise Unsupported(
          f"{self.op_name}: implementation {implementation!r} cannot serve these arguments: {why}"
        )
      return implementation
    backend = jax.default_backend()
    order = self.auto_order.get(backend, self.auto_order["default"])
    reasons = []
    for name in order:
      if name in self.implementations:
        why = self.reason(name, **arguments)
        if why is None:
          return name
        reasons.append(f"{name}: {why}")
    raise Unsupported(
      f"{self.op_name}: no implementation serves these arguments on "
      f"{backend}: " + "; ".join(reasons)
    )

  def __call__(self, implementation: str, **arguments):
    name = self.choose(implementation, **arguments)
    return self.implementations[name].fn(**arguments)
