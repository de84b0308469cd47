"""Pallas kernels (TPU = Mosaic, GPU = Triton flavours) of the batch-invariant ops.

On CPU they run with ``interpret=True`` and equal the jnp reference bit for bit
(``tests/kernels/test_pallas.py``); ``common.export_for`` lowers them for "cuda" and
"tpu" with ``jax.export``.
"""

from .attention_kernel import attention_forward
from .common import FLAVOURS, default_flavour, export_for
from .matmul_kernel import matmul
from .rms_norm_kernel import rms_norm

__all__ = ["FLAVOURS", "attention_forward", "default_flavour", "export_for", "matmul", "rms_norm"]
