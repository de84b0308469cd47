"""The paged KV cache's write never lands outside a session's pages. (Chunks appended
through page tables giving the training row's bits: tests/sampler/test_alignment.py.)"""

import jax.numpy as jnp
import numpy as np

from tml.model.kv_cache import RESERVED_PAGE, paged_write

PAGE = 64


def bits(x):
    return np.asarray(x).view(np.uint32)


def test_write_never_leaves_the_sessions_pages():
    """Rows past n_new, slots past the page table and unallocated (reserved) entries are
    dropped; every other page keeps its bits."""
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(6, PAGE, 2, 4)), jnp.float32)
    v = k + 1
    table = jnp.asarray([[2, RESERVED_PAGE], [4, 5]], jnp.int32)
    new = jnp.asarray(rng.normal(size=(2, 80, 2, 4)), jnp.float32)
    # session 0 writes 80 rows from slot 10: slots 64.. map to the reserved entry -> dropped
    # session 1 writes 3 real rows at slot 62 (page 4 then page 5), its padding dropped
    k2, v2 = paged_write(k, v, table, new, new, jnp.asarray([10, 62], jnp.int32), jnp.asarray([80, 3], jnp.int32))
    k0, k2 = np.asarray(k), np.asarray(k2)
    for p in (0, 1, 3):
        assert np.array_equal(bits(k2[p]), bits(k0[p]))
    assert np.array_equal(k2[2, 10:], np.asarray(new[0, :54]))
    assert np.array_equal(bits(k2[2, :10]), bits(k0[2, :10]))
    assert np.array_equal(k2[4, 62:], np.asarray(new[1, :2])) and np.array_equal(k2[5, 0], np.asarray(new[1, 2]))
    assert np.array_equal(bits(k2[5, 1:]), bits(k0[5, 1:])) and np.array_equal(bits(k2[4, :62]), bits(k0[4, :62]))
    # past the table's P pages (slot 128 and on), or into the reserved entry: dropped too
    k3, _ = paged_write(k, v, table, new[:, :4], new[:, :4], jnp.asarray([126, 127], jnp.int32), jnp.asarray([4, 4], jnp.int32))
    assert np.array_equal(bits(np.asarray(k3)[[0, 1, 3]]), bits(k0[[0, 1, 3]]))
    assert np.array_equal(np.asarray(k3)[5, 63], np.asarray(new[1, 0]))
