"""Bitwise comparison helpers (raw bits, never ``allclose``) for kernel and model tests."""

from __future__ import annotations

import numpy as np

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def bits(a) -> np.ndarray:
    """The raw bits of a float array as unsigned integers (bf16/f16 -> uint16, f32 -> uint32)."""
    a = np.asarray(a)
    return a.view(_UINT[a.dtype.itemsize])


def bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(bits(a), bits(b)))


def mismatch_fraction(a, b) -> float:
    """Fraction of elements whose bits differ (shapes must match)."""
    return float(np.mean(bits(a) != bits(b)))


def assert_bits_equal(a, b, msg: str = "") -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{msg}: shapes {a.shape} != {b.shape}"
    assert a.dtype == b.dtype, f"{msg}: dtypes {a.dtype} != {b.dtype}"
    if not np.array_equal(bits(a), bits(b)):
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        raise AssertionError(
            f"{msg}: {np.mean(bits(a) != bits(b)):.2%} of elements differ in their bits "
            f"(max abs diff {np.nanmax(diff):.3g})"
        )
