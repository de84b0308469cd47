"""The page pool: property test over random open/append/rollback/abort/close sequences."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tml.sampler.pages import RESERVED_PAGE, PagePool, PoolExhausted

OPS = st.lists(st.tuples(st.sampled_from(["open", "append", "rollback", "abort", "close"]),
                         st.integers(0, 5), st.integers(0, 200)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_random_sequences_leak_no_page_and_share_none(ops):
    pool = PagePool(n_pages=12, page_size=64, max_pages_per_session=4)
    lengths: dict[int, int] = {}
    for op, sid, n in ops:
        if op == "open":
            if sid not in lengths:
                pool.open(sid)
                lengths[sid] = 0
        elif sid not in lengths:
            continue
        elif op == "append":
            before = {s: pool.pages(s) for s in lengths}
            free = pool.n_free
            try:
                pool.ensure(sid, lengths[sid] + n)
                lengths[sid] += n
            except (PoolExhausted, ValueError):
                # all or nothing, and only this caller is affected
                assert pool.n_free == free and {s: pool.pages(s) for s in lengths} == before
        elif op == "rollback":
            keep_pages = pool.pages(sid)
            lengths[sid] = min(lengths[sid], n)
            pool.truncate(sid, lengths[sid])
            assert pool.pages(sid) == keep_pages[: len(pool.pages(sid))]  # a prefix: history never moves
        else:  # abort and close both return every page
            pool.close(sid)
            del lengths[sid]
        pool.check()
        for s, length in lengths.items():
            assert pool.slots(s) >= length
            table = pool.page_table(s)
            assert table.shape == (4,) and (table[len(pool.pages(s)):] == RESERVED_PAGE).all()
    for s in list(lengths):
        pool.close(s)
    pool.check()
    assert pool.n_free == 11


def test_errors_name_what_to_do():
    with pytest.raises(ValueError, match="multiple of the attention split"):
        PagePool(8, 48, 2)
    pool = PagePool(4, 64, 2)
    pool.open("a")
    pool.open("b")
    with pytest.raises(ValueError, match="past its capacity"):
        pool.ensure("a", 129)
    pool.ensure("a", 128)
    pool.ensure("b", 64)
    with pytest.raises(PoolExhausted, match="more n_pages"):
        pool.ensure("b", 65)
    assert pool.pages("b") == [3] and pool.pages("a") == [1, 2]
    pool.check()


def test_check_finds_leaks_and_double_ownership():
    pool = PagePool(6, 64, 3)
    pool.open("a")
    pool.ensure("a", 100)
    pool._free.pop()  # a leaked page
    with pytest.raises(AssertionError, match="leaked"):
        pool.check()
    pool = PagePool(6, 64, 3)
    pool.open("a")
    pool.open("b")
    pool.ensure("a", 64)
    pool._owned["b"].append(pool._owned["a"][0])
    with pytest.raises(AssertionError, match="owned by"):
        pool.check()
