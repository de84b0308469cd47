"""Batch-invariant kernels: one API, two modes (``batch_invariant``, ``standard``).

Every op takes ``mode=None`` (use the current mode: :func:`kernel_mode` override, else
the global default, ``"batch_invariant"``). In ``batch_invariant`` mode the bits of a
row's result never depend on how many other rows, query chunks, tokens or
tensor-parallel ranks shared the computation; ``standard`` is plain XLA.

    from tml.kernels import matmul, rms_norm, attention, kernel_mode
    f = jax.jit(lambda x, w: matmul(x, w))
    y = f(x, w)                             # batch_invariant
    with kernel_mode("standard"):
        y_std = f(x, w)                     # the same jitted function, re-traced

The mode (and ``impl``) is part of JAX's jit cache key, so every jitted program
follows a switch (:mod:`tml.kernels.mode`). Pallas versions of matmul, RMSNorm and
attention live in :mod:`tml.kernels.pallas` (used automatically on GPU/TPU,
interpreted on CPU in tests).

Imports go one way: API modules (``tiled_matmul``, ``reductions``,
``split_kv_attention``, ``moe``, ``collectives``) -> backends (``pallas/*``) -> shared
pieces (``split_kv``, ``tiling``); a backend never imports an API module.

Importing this package warns once (:class:`UnverifiedVersionWarning`) when the running
jax/jaxlib are not the versions the bitwise guarantees were measured on
(:mod:`tml.kernels.version_check`).
"""

if __name__ != "tml.kernels":
    # The repository root is on sys.path (Python started there), so this directory
    # shadows the PyPI package `kernels`, which transformers >= 5.25 imports.
    raise ImportError(
        f"{__file__} is tml's kernels/, imported as top-level {__name__!r} because the "
        "tml repository root is on sys.path (Python was started from it). It shadows the "
        "installed `kernels` package (needed by transformers >= 5.25). Import tml.kernels, "
        "and start Python from another directory (or run pytest, which appends the root)."
    )

from .collectives import (
    all_reduce_chunks,
    chunked_linear,
    one_shot_all_reduce,
    ordered_all_reduce,
    row_parallel_linear,
    tree_sum,
    two_shot_all_reduce,
)
from .mode import (
    BATCH_INVARIANT,
    MODES,
    STANDARD,
    compile_target,
    get_default_mode,
    get_mode,
    get_default_impl,
    kernel_impl,
    kernel_mode,
    mode_aware_jit,
    resolve_mode,
    set_default_impl,
    set_default_mode,
)
from .moe import moe_ffn, route_topk
from .paged_attention import paged_attention, paged_write
from .reductions import log_softmax, logsumexp, rms_norm, softmax
from .split_kv_attention import attention
from .tiled_matmul import bound_weight_grad_axes, linear, matmul, sharded_weight_grads, weight_grad
from .tiling import K_CHUNK, ROW_TILE, SPLIT_SIZE, ordered_sum, pairwise_sum, rounded, sequence_tree
from .version_check import UnverifiedVersionWarning, warn_if_unverified

warn_if_unverified()

__all__ = [
    "BATCH_INVARIANT",
    "K_CHUNK",
    "MODES",
    "ROW_TILE",
    "SPLIT_SIZE",
    "STANDARD",
    "all_reduce_chunks",
    "attention",
    "chunked_linear",
    "compile_target",
    "get_default_impl",
    "get_default_mode",
    "get_mode",
    "kernel_impl",
    "kernel_mode",
    "linear",
    "log_softmax",
    "logsumexp",
    "matmul",
    "sharded_weight_grads",
    "bound_weight_grad_axes",
    "weight_grad",
    "mode_aware_jit",
    "moe_ffn",
    "one_shot_all_reduce",
    "paged_attention",
    "paged_write",
    "ordered_all_reduce",
    "ordered_sum",
    "pairwise_sum",
    "rounded",
    "sequence_tree",
    "resolve_mode",
    "rms_norm",
    "route_topk",
    "row_parallel_linear",
    "set_default_impl",
    "set_default_mode",
    "softmax",
    "tree_sum",
    "two_shot_all_reduce",
    "UnverifiedVersionWarning",
    "warn_if_unverified",
]
