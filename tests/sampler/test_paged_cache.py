"""The paged KV cache: its write never lands outside a session's pages; the tick's
compiled calls write the pools in place (nothing grows with the pool); the paged
attention loop's step size changes no bits. (Chunks appended through page tables giving
the training row's bits: tests/sampler/test_alignment.py.)"""

import jax
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


def test_the_tick_programs_write_the_pool_in_place():
    """The compiled prefill and decode calls alias every pool (one per layer, k and v)
    input to its output, and their temporaries do not grow with the pool: 4 pages or
    40, the same bytes (a stacked pool sliced per layer and restacked made a temporary
    the size of the pool, copied on every call)."""
    from tests.model.tiny_model import tiny_model
    from tml.sampler import Engine

    model = tiny_model()
    temps = {}
    for n_pages in (4, 40):
        eng = Engine(model, max_sessions=2, batch_buckets=(2,), chunk_buckets=(8,), patch_buckets=(1,),
                     max_context=128, n_pages=n_pages, vocoder=False)
        pool_bytes = sum(a.nbytes for a in (*eng.k, *eng.v))
        assert len(eng.k) == len(eng.v) == model.cfg.n_layers
        for chunk in (8, 1):  # a prefill and a decode call (without the video encoder: it writes no KV)
            compiled = eng.lower(2, chunk, 1, video=False).compile()
            mem = compiled.memory_analysis()
            assert mem.alias_size_in_bytes == pool_bytes, (n_pages, chunk)
            assert compiled.as_text().count("may-alias") >= 2 * model.cfg.n_layers
            temps[n_pages, chunk] = mem.temp_size_in_bytes
    assert temps[4, 8] == temps[40, 8] and temps[4, 1] == temps[40, 1], temps


def test_splits_per_step_changes_no_bits():
    """The batch_invariant paged loop folds the same splits in the same order whatever
    number it gathers per step (the step's out-of-range splits are fully masked): raw bits
    equal for 1, 3 and 8 per step, sessions of different lengths in shuffled pages, a
    prefill chunk and a decode step, global and sliding-window attention. The comparison
    is sensitive: one visible key changed changes the bits."""
    from tml.kernels import paged_attention

    rng = np.random.default_rng(2)
    B, C, Hkv, G, D, P = 3, 8, 2, 2, 16, 6
    pool = jnp.asarray(rng.normal(size=(1 + B * P, PAGE, Hkv, D)) * 3, jnp.float32)
    table = jnp.asarray(1 + rng.permutation(B * P).reshape(B, P), jnp.int32)
    lengths = np.array([70, 300, 383], np.int32)
    q = jnp.asarray(rng.normal(size=(B, C, Hkv * G, D)), jnp.float32)
    run = jax.jit(lambda q, kp, pos, lens, window, u: paged_attention(
        q, kp, kp * 0.5, table, q_positions=pos, kv_lengths=lens, sliding_window=window, splits_per_step=u,
        mode="batch_invariant", impl="reference"), static_argnums=(4, 5))
    for n in (C, 1):
        lens = jnp.asarray(lengths - C + n)
        pos = jnp.asarray(lengths[:, None] - C + np.minimum(np.arange(C), n - 1)[None], jnp.int32)
        for window in (None, 100):
            outs = [bits(run(q, pool, pos, lens, window, u)) for u in (1, 3, 8)]
            assert all(np.array_equal(outs[0], o) for o in outs[1:]), (n, window)
    key = int(lens[2]) - 1  # session 2's last visible key (the decode step's lengths)
    moved = pool.at[int(table[2, key // PAGE]), key % PAGE].add(1.0)
    assert not np.array_equal(bits(run(q, moved, pos, lens, None, 8)), bits(run(q, pool, pos, lens, None, 8)))
