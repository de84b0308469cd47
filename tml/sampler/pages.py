"""The page pool: which KV pages of the one shared pool each session owns (pure Python).

The keys and values of every session live in one pool per layer
(:class:`tml.model.kv_cache.PagedKVCache`, n_layers arrays ``[n_pages, page_size, Hkv, hd]``);
a session's logical slot ``s`` is stored at ``pages[s // page_size]``, offset
``s % page_size``. Because ``page_size`` is a multiple of the attention split size
(:data:`tml.kernels.SPLIT_SIZE`), the split a key falls in is a function of its logical
slot alone, so paging changes no bits.

Page :data:`RESERVED_PAGE` (0) is never handed out: unused page-table entries point at it
and the cache write drops any row that would land there, so a row of a padded batch or a
slot past a session's allocation is written nowhere.

Appending never copies a session's history (it only adds pages at the end of its list);
:meth:`PagePool.truncate` (rollback, or giving back an unused reservation) and
:meth:`PagePool.close` return pages to the free list. :meth:`PagePool.check` verifies
the invariant: every page is free, reserved, or owned by exactly one session.
"""

from __future__ import annotations

import numpy as np

from tml.kernels import SPLIT_SIZE

RESERVED_PAGE = 0


class PoolExhausted(RuntimeError):
    """Raised to the one caller whose request does not fit the free pages."""


class PagePool:
    """A fixed pool of ``n_pages`` pages of ``page_size`` slots.

    Args:
        n_pages: pages in the pool, including the reserved page 0.
        page_size: slots per page, a multiple of :data:`tml.kernels.SPLIT_SIZE`.
        max_pages_per_session: width of a session's page table (its capacity is
            ``max_pages_per_session * page_size`` slots).
    """

    def __init__(self, n_pages: int, page_size: int, max_pages_per_session: int):
        if page_size <= 0 or page_size % SPLIT_SIZE:
            raise ValueError(f"page_size={page_size} must be a positive multiple of the attention split "
                             f"size {SPLIT_SIZE} (tml.kernels.SPLIT_SIZE), so paging changes no bits")
        if n_pages < 2:
            raise ValueError(f"n_pages={n_pages}: the pool needs the reserved page 0 and at least one more")
        if max_pages_per_session < 1:
            raise ValueError(f"max_pages_per_session={max_pages_per_session} must be >= 1")
        self.n_pages, self.page_size, self.max_pages = n_pages, page_size, max_pages_per_session
        # LIFO free list; popping from the end hands out low page ids first
        self._free: list[int] = list(range(n_pages - 1, RESERVED_PAGE, -1))
        self._owned: dict[object, list[int]] = {}

    # ------------------------------------------------------------------ queries
    @property
    def capacity(self) -> int:
        """Slots a single session may hold."""
        return self.max_pages * self.page_size

    @property
    def n_free(self) -> int:
        return len(self._free)

    def sessions(self) -> list:
        return list(self._owned)

    def pages(self, sid) -> list[int]:
        return list(self._owned[sid])

    def slots(self, sid) -> int:
        """Slots currently backed by pages for ``sid``."""
        return len(self._owned[sid]) * self.page_size

    def page_table(self, sid) -> np.ndarray:
        """int32 [max_pages_per_session]: the session's pages, then :data:`RESERVED_PAGE`."""
        row = np.full(self.max_pages, RESERVED_PAGE, np.int32)
        owned = self._owned[sid]
        row[: len(owned)] = owned
        return row

    # ---------------------------------------------------------------- mutations
    def open(self, sid) -> None:
        if sid in self._owned:
            raise KeyError(f"session {sid!r} already holds pages")
        self._owned[sid] = []

    def ensure(self, sid, n_slots: int) -> None:
        """Back slots ``[0, n_slots)`` of ``sid`` with pages, allocating at the end of its
        list. All or nothing: on error no page moves.

        Raises ValueError past the session's capacity, :class:`PoolExhausted` when the
        free pages do not suffice (both name what to do)."""
        owned = self._owned[sid]
        if n_slots > self.capacity:
            raise ValueError(f"session {sid!r} needs {n_slots} KV slots, past its capacity of {self.capacity} "
                             f"({self.max_pages} pages of {self.page_size}): close or roll it back, or build "
                             "the engine with a larger max_context")
        need = -(-n_slots // self.page_size) - len(owned)
        if need <= 0:
            return
        if need > len(self._free):
            raise PoolExhausted(f"session {sid!r} needs {need} more KV pages but only {len(self._free)} of "
                                f"{self.n_pages - 1} are free: close idle sessions or build the engine with "
                                "more n_pages")
        for _ in range(need):
            owned.append(self._free.pop())

    def truncate(self, sid, n_slots: int) -> None:
        """Keep only the pages backing slots ``[0, n_slots)``; the rest go back to the pool."""
        owned = self._owned[sid]
        keep = -(-max(n_slots, 0) // self.page_size)
        while len(owned) > keep:
            self._free.append(owned.pop())

    def close(self, sid) -> None:
        """Return every page of ``sid`` (close and abort alike)."""
        self.truncate(sid, 0)
        del self._owned[sid]

    # ---------------------------------------------------------------- invariant
    def check(self) -> None:
        """Raise AssertionError unless every page but the reserved one is either free or
        owned by exactly one session, exactly once (no page leaked or double-owned)."""
        seen: dict[int, object] = {}
        for sid, owned in self._owned.items():
            assert len(owned) <= self.max_pages, f"session {sid!r} holds {len(owned)} > {self.max_pages} pages"
            for p in owned:
                assert p != RESERVED_PAGE, f"session {sid!r} owns the reserved page"
                assert p not in seen, f"page {p} owned by {seen[p]!r} and {sid!r}"
                seen[p] = sid
        for p in self._free:
            assert p != RESERVED_PAGE, "the reserved page is on the free list"
            assert p not in seen, f"page {p} is free and owned by {seen.get(p)!r}"
            seen[p] = "<free>"
        missing = set(range(1, self.n_pages)) - set(seen)
        assert not missing, f"pages leaked (neither free nor owned): {sorted(missing)}"
        assert len(seen) == self.n_pages - 1, "a page is listed twice"
