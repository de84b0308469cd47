"""The jax/jaxlib versions the bitwise guarantees were measured on, and the one warning.

Every batch-invariance fact of :mod:`tml.kernels` (the row-tile GEMM strategies, the
K-chunk FMA chains, the ``exp`` remainder loops, the FMA contraction across fusions,
:mod:`tml.kernels.tiling`) is a measured behaviour of XLA:CPU as shipped in one
jaxlib, not a property JAX promises; a new XLA can pick other GEMM strategies or fuse
differently and break a bitwise test without any code change here. ``pyproject.toml``
therefore pins ``jax``/``jaxlib`` to ``>=0.10.2,<0.11`` and this module **warns once,
when** ``tml.kernels`` **is imported** (the one place every trainer, sampler and
notebook passes through), if the running versions are not the measured ones:

    UnverifiedVersionWarning: tml's bitwise guarantees (batch, chunking and TP
    invariance) were measured with jax 0.10.2 / jaxlib 0.10.2; this process runs
    jax 0.11.0 / jaxlib 0.11.0, where they are unverified: run tests/kernels ...

Silence it with ``warnings.filterwarnings("ignore", category=UnverifiedVersionWarning)``
before importing ``tml.kernels`` once the suite has been re-run on the new version (and
add the version to :data:`VERIFIED` in the same change).
"""

from __future__ import annotations

import warnings

#: (jax, jaxlib) version pairs on which the bitwise test suite was run and passed.
VERIFIED: tuple[tuple[str, str], ...] = (("0.10.2", "0.10.2"),)

_warned = False


class UnverifiedVersionWarning(UserWarning):
    """The running jax/jaxlib is not one the bitwise guarantees were measured on."""


def running_versions() -> tuple[str, str]:
    """(jax.__version__, jaxlib.__version__) of this process."""
    import jax
    import jaxlib

    return jax.__version__, jaxlib.__version__


def unverified_message(jax_version: str, jaxlib_version: str) -> str | None:
    """The warning text for these versions, or ``None`` when they are verified."""
    if (jax_version, jaxlib_version) in VERIFIED:
        return None
    measured = " or ".join(f"jax {a} / jaxlib {b}" for a, b in VERIFIED)
    return (
        f"tml's bitwise guarantees (batch, chunking and tensor-parallel invariance of "
        f"tml.kernels) were measured with {measured}; this process runs jax {jax_version} / "
        f"jaxlib {jaxlib_version}, where they are unverified. Run the bitwise tests "
        f"(pytest tests/kernels tests/train/test_parallel.py) on this version before relying "
        f"on them, or install the pinned range (pip install 'jax>=0.10.2,<0.11' 'jaxlib>=0.10.2,<0.11')."
    )


def warn_if_unverified() -> bool:
    """Warn (once per process) when the running jax/jaxlib are not verified.

    Returns whether a warning was issued by this call. Called by ``tml.kernels`` at import.
    """
    global _warned
    if _warned:
        return False
    msg = unverified_message(*running_versions())
    if msg is None:
        return False
    _warned = True
    warnings.warn(msg, UnverifiedVersionWarning, stacklevel=3)
    return True
