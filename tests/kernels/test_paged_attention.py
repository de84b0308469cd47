"""paged_attention / paged_write: the skipping rule (a fully masked split leaves the
running state's bits unchanged), paged chunked prefill and decode of several sessions in
shuffled pages vs the training row (full and packed) through ``attention`` (raw bits),
the ``standard`` companion, the write never leaving a session's pages."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tml.kernels import attention, paged_attention, paged_write
from tml.kernels.split_kv import NEG, combine, split_partials
from tml.kernels.testing import assert_bits_equal, bits, bits_equal

HKV, G, D = 2, 2, 32
PAGE = 128  # two splits of 64 per page
N_PAGES = 16
P = 3  # pages per session in the table (capacity 384 slots)
LENGTHS = (1, 70, 130, 200)  # sessions crossing split and page boundaries
CHUNK = 16  # every prefill call is padded to this many queries (one compiled shape)

attn = jax.jit(attention, static_argnames=("causal", "sliding_window", "scale", "split_size", "mode", "impl"))
write = jax.jit(paged_write)


@functools.partial(jax.jit, static_argnames=("window", "mode", "impl"))
def paged(q, k_pages, v_pages, table, pos, lens, window=None, mode=None, impl=None):
    return paged_attention(q, k_pages, v_pages, table, q_positions=pos, kv_lengths=lens,
                           sliding_window=window, mode=mode, impl=impl)


def test_fully_masked_split_leaves_state_unchanged():
    """combine(state, partials of a split with no visible key) has the state's bits,
    for empty states (c = NEG) and for states of every magnitude."""
    rng = np.random.default_rng(0)
    R, S, Dv = 32, 64, 64
    c = np.ceil(rng.uniform(-200, 200, (R, 1))).astype(np.float32)
    c[:4] = NEG  # rows that have seen no key yet
    l = rng.uniform(0.5, 70, (R, 1)).astype(np.float32)
    o = (rng.standard_normal((R, Dv)) * 10.0 ** rng.integers(-30, 30, (R, 1))).astype(np.float32)
    l[:4], o[:4] = 0, 0
    o[5, :7] = 0  # exact zeros inside a non-empty state
    state = tuple(jnp.asarray(a) for a in (c, l, o))
    s = jnp.asarray(rng.standard_normal((R, S)) * 30, jnp.float32)
    v = jnp.asarray(rng.standard_normal((S, Dv)) * 100, jnp.float32)

    @jax.jit
    def fold_masked(state, s, v):
        parts = split_partials(s, jnp.zeros(s.shape, bool), v)
        return parts, combine(state, *parts)

    (c_s, l_s, o_s), folded = fold_masked(state, s, v)
    assert np.all(np.asarray(c_s) == NEG) and not np.any(np.asarray(l_s)) and not np.any(np.asarray(o_s))
    for a, b, name in zip(folded, state, "clo"):
        assert_bits_equal(a, b, f"{name} after a fully masked split")
    # and a split with one visible key does change it (the test can fail)
    one = jax.jit(lambda st, s, v: combine(st, *split_partials(s, jnp.arange(S)[None, :] == 0, v)))(state, s, v)
    assert not bits_equal(one[2], state[2])


@pytest.fixture(scope="module")
def sessions():
    """Four sessions of LENGTHS keys in shuffled pages of a pool whose other pages hold
    large finite garbage; q, k, v also laid out as full rows [4, 200, ...]."""
    rng = np.random.default_rng(1)
    B, Lmax = len(LENGTHS), max(LENGTHS)
    q = rng.standard_normal((B, Lmax, HKV * G, D)).astype(np.float32)
    k = rng.standard_normal((B, Lmax, HKV, D)).astype(np.float32)
    v = rng.standard_normal((B, Lmax, HKV, D)).astype(np.float32)
    table = rng.permutation(N_PAGES)[: B * P].reshape(B, P).astype(np.int32)
    garbage = (rng.standard_normal((N_PAGES, PAGE, HKV, D)) * 100).astype(np.float32)
    return {"q": q, "k": k, "v": v, "table": table, "pool": garbage, "rng": rng}


def _chunks(rng, L):
    out, left = [], L
    while left:
        out.append(min(left, int(rng.choice([1, 5, 16]))))
        left -= out[-1]
    return out


def _run_paged(sx, window, mode=None):
    """Prefill every session in random chunks (each call padded to CHUNK queries, the
    padding rows garbage), then decode its last 3 tokens one by one; writes go through
    paged_write. -> per-session outputs [L_b, Hq, D] in slot order."""
    rng = np.random.default_rng(2)
    q, k, v, table = sx["q"], sx["k"], sx["v"], sx["table"]
    B = len(LENGTHS)
    kp, vp = jnp.asarray(sx["pool"]), jnp.asarray(sx["pool"])
    plans = [_chunks(rng, L - 3) + [1, 1, 1] if L > 3 else [1] * L for L in LENGTHS]
    done = np.zeros(B, np.int32)
    outs = [[] for _ in range(B)]
    for step in range(max(len(p) for p in plans)):
        n = np.array([p[step] if step < len(p) else 0 for p in plans], np.int32)
        C = 1 if np.all(n <= 1) else CHUNK
        qc = (rng.standard_normal((B, C, HKV * G, D)) * 100).astype(np.float32)
        kc = (rng.standard_normal((B, C, HKV, D)) * 100).astype(np.float32)
        vc = (rng.standard_normal((B, C, HKV, D)) * 100).astype(np.float32)
        pos = np.zeros((B, C), np.int32)
        for b in range(B):
            s, e = done[b], done[b] + n[b]
            qc[b, : n[b]], kc[b, : n[b]], vc[b, : n[b]] = q[b, s:e], k[b, s:e], v[b, s:e]
            pos[b] = np.arange(s, s + C)
            pos[b, n[b]:] = max(e - 1, 0)  # padding queries at the last real position
        kp, vp = write(kp, vp, table, kc, vc, done, n)
        out = np.asarray(paged(qc, kp, vp, table, pos, done + n, window=window, mode=mode))
        for b in range(B):
            outs[b].append(out[b, : n[b]])
        done = done + n
    assert list(done) == list(LENGTHS)
    return [np.concatenate(o) for o in outs]


@pytest.mark.parametrize("window", [None, 50])
def test_paged_prefill_and_decode_equal_training_rows(sessions, window):
    sx = sessions
    paged_out = _run_paged(sx, window)
    # full rows: the sessions as rows of one batch (a query never sees later keys)
    full = np.asarray(attn(sx["q"], sx["k"], sx["v"], sliding_window=window))
    # packed: the sessions one after another in one row, segments aligned to the split size
    starts = np.cumsum([0] + [-(-L // 64) * 64 for L in LENGTHS])
    T = int(starts[-1])
    qp, kp, vp = (np.zeros((1, T) + a.shape[2:], np.float32) for a in (sx["q"], sx["k"], sx["v"]))
    seg = np.full((1, T), 99, np.int32)
    for b, L in enumerate(LENGTHS):
        sl = slice(starts[b], starts[b] + L)
        qp[0, sl], kp[0, sl], vp[0, sl], seg[0, sl] = sx["q"][b, :L], sx["k"][b, :L], sx["v"][b, :L], b
    packed = np.asarray(attn(qp, kp, vp, q_segment_ids=seg, kv_segment_ids=seg, sliding_window=window))
    for b, L in enumerate(LENGTHS):
        assert_bits_equal(paged_out[b], full[b, :L], f"session {b} (L={L}) paged vs full row, window {window}")
        assert_bits_equal(paged_out[b], packed[0, starts[b] : starts[b] + L], f"session {b} paged vs packed row")


def test_standard_mode_paged_differs_from_training_row(sessions):
    sx = sessions
    paged_std = _run_paged(sx, None, mode="standard")
    full_std = np.asarray(attn(sx["q"], sx["k"], sx["v"], mode="standard"))
    same = [bits_equal(paged_std[b], full_std[b, :L]) for b, L in enumerate(LENGTHS)]
    assert not all(same), "standard paged attention matched the training row everywhere"
    for b, L in enumerate(LENGTHS):  # it is the same attention, only the bits move
        np.testing.assert_allclose(paged_std[b], full_std[b, :L], atol=3e-6, rtol=3e-6)


def test_paged_write_never_leaves_the_sessions_pages():
    rng = np.random.default_rng(3)
    pool = jnp.asarray(rng.standard_normal((N_PAGES, PAGE, HKV, D)), jnp.float32)
    table = np.array([[5, 2, 9], [0, 11, 7]], np.int32)
    C = 40
    kn = jnp.asarray(rng.standard_normal((2, C, HKV, D)), jnp.float32)
    # session 0: 30 of 40 rows from slot 110 (crosses page 5 -> page 2); session 1: 20
    # rows from slot 370, 14 of them past its 3 pages (capacity 384) -> dropped
    start, n_new = np.array([110, 370], np.int32), np.array([30, 20], np.int32)
    k, v = write(pool, pool * 2, table, kn, kn * 3, start, n_new)
    k, v, p0 = np.asarray(k), np.asarray(v), np.asarray(pool)
    expect = p0.copy()
    expect[5, 110:128] = kn[0, :18]
    expect[2, 0:12] = kn[0, 18:30]
    expect[7, 114:128] = kn[1, :14]
    assert_bits_equal(k, expect, "k pool after the write")
    expect_v = np.array(pool * 2)
    expect_v[5, 110:128], expect_v[2, 0:12], expect_v[7, 114:128] = kn[0, :18] * 3, kn[0, 18:30] * 3, kn[1, :14] * 3
    assert_bits_equal(v, expect_v, "v pool after the write")
    untouched = [p for p in range(N_PAGES) if p not in (5, 2, 7)]
    assert np.array_equal(bits(k[untouched]), bits(p0[untouched]))


def test_bad_shapes_name_the_fix():
    q = jnp.zeros((1, 1, 4, 32))
    pool = jnp.zeros((4, 96, 2, 32))
    with pytest.raises(ValueError, match="multiple of split_size"):
        paged_attention(q, pool, pool, jnp.zeros((1, 2), jnp.int32), q_positions=jnp.zeros((1, 1), jnp.int32),
                        kv_lengths=jnp.ones((1,), jnp.int32))
    with pytest.raises(ValueError, match="page_table"):
        paged_attention(q, pool[:, :64], pool[:, :64], jnp.zeros((2, 2), jnp.int32),
                        q_positions=jnp.zeros((1, 1), jnp.int32), kv_lengths=jnp.ones((1,), jnp.int32))


def test_pallas_impl_equals_reference():
    rng = np.random.default_rng(4)
    pool = jnp.asarray(rng.standard_normal((6, PAGE, HKV, D)), jnp.float32)
    table = np.array([[3, 1], [0, 5]], np.int32)
    q = jnp.asarray(rng.standard_normal((2, 1, HKV * G, D)), jnp.float32)
    lens = np.array([150, 40], np.int32)
    pos = (lens - 1)[:, None]
    ref = paged(q, pool, pool, table, pos, lens, window=100, impl="reference")
    pal = paged(q, pool, pool, table, pos, lens, window=100, impl="pallas")
    assert_bits_equal(pal, ref, "pallas (gathered pages) vs reference paged attention")


def test_loop_visits_only_the_visible_splits():
    """split_range: the loop runs from the lowest first-visible to the highest
    last-visible split over the batch (padding rows and empty sessions do not count)."""
    from tml.kernels.paged_attention import split_range

    q_pos = jnp.asarray([[300, 301], [64, 0], [5, 900]], jnp.int32)
    real = jnp.asarray([[True, True], [True, False], [True, False]])
    n_valid = jnp.asarray([302, 65, 0], jnp.int32)  # session 2 sees nothing
    assert [int(x) for x in split_range(q_pos, real, n_valid, None, 64)] == [0, 4]
    assert [int(x) for x in split_range(q_pos, real, n_valid, 100, 64)] == [0, 4]  # session 1 starts at 0
    assert [int(x) for x in split_range(q_pos[:1], real[:1], n_valid[:1], 100, 64)] == [3, 4]
    lo, hi = split_range(q_pos[2:], real[2:], n_valid[2:], None, 64)
    assert int(hi) < int(lo)
