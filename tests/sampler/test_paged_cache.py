"""The paged KV cache in the model: chunks appended through page tables give the bits of
the full training row; writes never land outside a session's pages."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.model.tiny_model import CFG, make_batch, tiny_model
from tml import kernels
from tml.model.kv_cache import RESERVED_PAGE, PagedKVCache, paged_write

KEYS = ("tokens", "modality", "positions", "segment_ids", "dmel", "patch_index")
PAGE = 64


def bits(x):
    return np.asarray(x).view(np.uint32)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def run_paged(model, batch, segs, tables, chunk, step):
    """Feed segments ``segs`` of row 0 (one session each, batched) in chunks of ``chunk``
    through their page tables; -> text logits per session at its positions."""
    idxs = [np.flatnonzero(np.asarray(batch["segment_ids"][0]) == s) for s in segs]
    n_pages = int(np.max(tables)) + 2
    k, v = PagedKVCache.empty_pool(CFG, n_pages, PAGE)
    cache = PagedKVCache(k, v, jnp.asarray(tables, jnp.int32), jnp.zeros(len(segs), jnp.int32))
    outs = [[] for _ in segs]
    done = [0] * len(segs)
    while any(d < len(i) for d, i in zip(done, idxs)):
        sl, n = [], []
        for b, idx in enumerate(idxs):
            m = min(chunk, len(idx) - done[b])
            part = idx[done[b]:done[b] + m] if m > 0 else idx[:1]
            sl.append(np.r_[part, np.full(chunk - len(part), part[-1])])
            n.append(max(m, 0))
        rows = np.asarray(sl)
        c = {key: jnp.asarray(np.asarray(batch[key][0])[rows]) for key in KEYS}
        c["patches"] = jnp.broadcast_to(batch["patches"][0:1], (len(segs), *batch["patches"].shape[1:]))
        out = step(model, c, cache, jnp.asarray(n, jnp.int32))
        cache = out.cache
        for b in range(len(segs)):
            outs[b].append(np.asarray(out.text_logits[b, :n[b]]))
            done[b] += n[b]
    return idxs, [np.concatenate(o) for o in outs], cache


@pytest.mark.parametrize("mode,equal", [("batch_invariant", True), ("standard", False)])
def test_paged_chunks_equal_full_rows_bitwise(model, mode, equal):
    """Two sessions batched, pages scattered and interleaved in the pool, chunks of 5.
    ``standard`` diverges here: its dense softmax over the whole gathered capacity (P*64
    slots) sums in another order than the 256-slot row (measured on the 2-core CPU)."""
    batch = make_batch(1)
    segs = np.unique(np.asarray(batch["segment_ids"][0]))
    segs = segs[segs > 0][:2]
    tables = [[5, 2, 7, 0], [3, 6, 1, 0]]
    fwd = nnx.jit(lambda m, b: m(b))
    step = nnx.jit(lambda m, c, cache, n: m(c, cache=cache, n_new=n))
    with kernels.kernel_mode(mode):
        full = fwd(model, batch)
        idxs, texts, cache = run_paged(model, batch, segs, tables, 5, step)
    same = all(np.array_equal(bits(t), bits(full.text_logits[0, i])) for i, t in zip(idxs, texts))
    assert same == equal
    assert cache.lengths.tolist() == [len(i) for i in idxs]


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
