"""The kernel-mode switch: ``"batch_invariant"`` (default) or ``"standard"``.

Every op in :mod:`tml.kernels` takes an optional ``mode=`` argument. When it is
``None`` the op uses the *current* mode: the innermost :func:`kernel_mode` override
if one is active, else the global default set by :func:`set_default_mode`.

The mode is read **at trace time**, in Python. ``jax.jit`` caches a traced
function by its arguments, not by this global, so a function jitted while the
mode was ``"standard"`` keeps running the standard kernels after the mode
changes. Three ways to stay correct:

* make the mode part of the static configuration of the jitted function
  (pass ``mode=`` explicitly from a config field that is a static argument), or
* wrap the function with :func:`mode_aware_jit`, which adds the current mode to
  the jit cache key (a mode switch re-traces), or
* call ``jax.clear_caches()`` after switching (blunt, but works).

Example::

    from tml.kernels import kernel_mode, matmul
    y = matmul(x, w)                       # batch_invariant (default)
    with kernel_mode("standard"):
        y_std = matmul(x, w)               # plain XLA
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax

Mode = Literal["batch_invariant", "standard"]
MODES: tuple[str, ...] = ("batch_invariant", "standard")
BATCH_INVARIANT: Mode = "batch_invariant"
STANDARD: Mode = "standard"

_default_mode: str = BATCH_INVARIANT
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("tml_kernel_mode", default=None)


def _check(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; expected one of {MODES}")
    return mode


def set_default_mode(mode: str) -> None:
    """Set the process-wide default mode (used when no :func:`kernel_mode` is active)."""
    global _default_mode
    _default_mode = _check(mode)


def get_default_mode() -> str:
    return _default_mode


def get_mode() -> str:
    """The mode an op uses when called with ``mode=None``."""
    override = _override.get()
    return override if override is not None else _default_mode


def resolve_mode(mode: str | None) -> str:
    """``mode`` if given (validated), else :func:`get_mode`."""
    return get_mode() if mode is None else _check(mode)


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[str]:
    """Scoped override: ``with kernel_mode("standard"): ...``. Nests; thread/async safe."""
    token = _override.set(_check(mode))
    try:
        yield mode
    finally:
        _override.reset(token)


def mode_aware_jit(fn: Callable[..., Any] | None = None, **jit_kwargs: Any) -> Callable[..., Any]:
    """``jax.jit`` whose cache key includes the current kernel mode.

    ``mode_aware_jit(f)(*args)`` traces ``f`` under the mode that is current at
    call time, and re-traces when the mode changes. Extra keyword arguments go to
    ``jax.jit`` (``static_argnames`` etc.).
    """
    if fn is None:
        return functools.partial(mode_aware_jit, **jit_kwargs)

    static_argnames = tuple(jit_kwargs.pop("static_argnames", ())) + ("_tml_kernel_mode",)

    def inner(*args: Any, _tml_kernel_mode: str, **kwargs: Any) -> Any:
        with kernel_mode(_tml_kernel_mode):
            return fn(*args, **kwargs)

    jitted = jax.jit(inner, static_argnames=static_argnames, **jit_kwargs)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return jitted(*args, _tml_kernel_mode=get_mode(), **kwargs)

    wrapper.jitted = jitted  # type: ignore[attr-defined]
    return wrapper


# ---------------------------------------------------------------------------
# Implementation choice for batch_invariant mode: the jnp reference or Pallas.
# ---------------------------------------------------------------------------

IMPLS: tuple[str, ...] = ("auto", "reference", "pallas")
_default_impl: str = "auto"


def set_default_impl(impl: str) -> None:
    """``"auto"`` (Pallas on GPU/TPU where a kernel exists, else reference),
    ``"reference"`` (always the pure-jnp algorithm) or ``"pallas"``."""
    global _default_impl
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    _default_impl = impl


def resolve_impl(impl: str | None) -> str:
    """Concrete implementation for a batch_invariant op: ``"reference"`` or ``"pallas"``."""
    impl = _default_impl if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "reference"
    return impl
