"""The kernel-mode switch: ``"batch_invariant"`` (default) or ``"standard"``, and the
batch_invariant implementation choice (``"auto"`` / ``"reference"`` / ``"pallas"``).

Every op in :mod:`tml.kernels` takes optional ``mode=`` / ``impl=`` arguments. When one
is ``None`` the op uses the *current* value: the innermost :func:`kernel_mode` /
:func:`kernel_impl` override if one is active in this thread, else the process-wide
default set by :func:`set_default_mode` / :func:`set_default_impl`.

Both values live in a ``jax.make_user_context`` context, whose current value is part
of JAX's tracing, lowering and compilation cache keys. The mode is still read in
Python while a function is traced, but **a switch re-traces every jitted program** —
``jax.jit``, ``nnx.jit``, the trainer's :meth:`tml.train.step.TrainStep.jit`, the
bodies of ``lax.scan`` / ``lax.cond``, ``jax.export`` — so a function jitted under one
mode can never silently keep running it after the switch. (With a plain global, a
notebook comparing modes showed ``standard`` perfectly aligned: its second call hit the
``batch_invariant`` trace in the jit cache.) Switching back finds the first program in
the cache again; nothing is compiled twice per mode.

The key is the *effective* value, so ``set_default_mode("standard")`` and
``with kernel_mode("standard")`` share one compiled program. Overrides are
thread-local (other threads see the default); contexts are created once, at import.

Example::

    from tml.kernels import kernel_mode, matmul
    f = jax.jit(lambda x, w: matmul(x, w))
    y = f(x, w)                            # batch_invariant (default)
    with kernel_mode("standard"):
        y_std = f(x, w)                    # re-traced: plain XLA
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax

Mode = Literal["batch_invariant", "standard"]
MODES: tuple[str, ...] = ("batch_invariant", "standard")
BATCH_INVARIANT: Mode = "batch_invariant"
STANDARD: Mode = "standard"
IMPLS: tuple[str, ...] = ("auto", "reference", "pallas")

_mode = jax.make_user_context(BATCH_INVARIANT)
_impl = jax.make_user_context("auto")
PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "rocm", "tpu")
_target = jax.make_user_context(None)  # None = this process's backend


def _check(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; expected one of {MODES}")
    return mode


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    return impl


def set_default_mode(mode: str) -> None:
    """Set the process-wide default mode (used when no :func:`kernel_mode` is active)."""
    _mode.set_global(_check(mode))


def get_default_mode() -> str:
    return _mode.get_global()


def get_mode() -> str:
    """The mode an op uses when called with ``mode=None``."""
    return _mode.value


def resolve_mode(mode: str | None) -> str:
    """``mode`` if given (validated), else :func:`get_mode`."""
    return get_mode() if mode is None else _check(mode)


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[str]:
    """Scoped override: ``with kernel_mode("standard"): ...``. Nests; thread-local."""
    with _mode(_check(mode)):
        yield mode


def mode_aware_jit(fn: Callable[..., Any] | None = None, **jit_kwargs: Any) -> Callable[..., Any]:
    """``jax.jit`` (kept for old callers): every jitted program now follows the mode."""
    if fn is None:
        return lambda f: jax.jit(f, **jit_kwargs)
    return jax.jit(fn, **jit_kwargs)


def set_default_impl(impl: str) -> None:
    """The process-wide batch_invariant implementation: ``"auto"`` (Pallas on GPU/TPU
    where a kernel exists, else reference), ``"reference"`` (always the pure-jnp
    algorithm) or ``"pallas"``."""
    _impl.set_global(_check_impl(impl))


def get_default_impl() -> str:
    return _impl.get_global()


@contextlib.contextmanager
def kernel_impl(impl: str) -> Iterator[str]:
    """Scoped override of the implementation: ``with kernel_impl("pallas"): ...``."""
    with _impl(_check_impl(impl)):
        yield impl


@contextlib.contextmanager
def compile_target(platform: str) -> Iterator[str]:
    """Trace for ``platform`` ("cpu", "cuda", "rocm", "tpu") instead of this process's backend.

    For ahead-of-time compilation and ``jax.export`` from a CPU host: inside, ``impl="auto"``
    resolves as on that platform (Pallas on cuda/rocm/tpu) and the Pallas kernels take
    that platform's flavour, compiled rather than interpreted (``triton`` for cuda/rocm,
    Mosaic ``tpu`` for tpu). Like the mode, the target is part of every jit cache key::

        with compile_target("tpu"):
            jax.export.export(jax.jit(step), platforms=["tpu"])(*shapes)
    """
    if platform not in PLATFORMS:
        raise ValueError(f"unknown compile target {platform!r}; expected one of {PLATFORMS}")
    with _target(platform):
        yield platform


def target_platform() -> str:
    """The platform being traced for: the :func:`compile_target` override, else this
    process's backend (``"gpu"`` reported as ``"cuda"``)."""
    if _target.value is not None:
        return _target.value
    backend = jax.default_backend()
    return "cuda" if backend == "gpu" else backend


def resolve_impl(impl: str | None) -> str:
    """Concrete implementation for a batch_invariant op: ``"reference"`` or ``"pallas"``
    (``"auto"``: Pallas when tracing for cuda/rocm/tpu, :func:`target_platform`)."""
    impl = _check_impl(_impl.value if impl is None else impl)
    if impl == "auto":
        return "pallas" if target_platform() in ("cuda", "rocm", "tpu") else "reference"
    return impl
