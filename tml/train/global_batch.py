"""Global batches that do not depend on how many processes read them.

The global batch of ``B`` rows is the concatenation, in reader order, of ``R``
**canonical readers** (``loader.readers``), each a :class:`ShardLoader` over its own
disjoint ``1/R`` of the shards with ``B/R`` rows per batch. Process ``p`` of ``P`` runs
readers ``[p·R/P, (p+1)·R/P)`` and holds those rows, which are exactly its rows of the
global batch (it is split over the data axis in row order). So one process, or two, or
``R`` processes see the same global batches, and a run restarted on another number of
processes continues the same data order.

    batches = GlobalBatches.from_config(cfg, "train", global_rows=8)
    for rows in batches:            # dict of numpy [8 / P, ...] (this process's rows)
        ...
    batches.state()                 # {"count": 2, "readers": {"0": {...}, "1": {...}}} (this process's)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


class GlobalBatches:
    """This process's rows of each global batch, read by its canonical readers."""

    def __init__(self, make_reader, *, global_rows: int, readers: int, process_index: int = 0,
                 process_count: int = 1, state: Mapping | None = None):
        """make_reader(index, count, rows, state) → a ShardLoader-like iterable with ``state()``."""
        readers = readers or process_count
        if readers % process_count:
            raise ValueError(f"loader.readers={readers} must be a multiple of the {process_count} "
                             f"processes (each process runs whole readers)")
        if global_rows % readers:
            raise ValueError(f"train.batch_size={global_rows} must be a multiple of loader.readers={readers}")
        per = readers // process_count
        self.ids = list(range(process_index * per, (process_index + 1) * per))
        if state and state.get("count") not in (None, readers):
            raise ValueError(f"the loader state to resume was saved with loader.readers={state['count']}, "
                             f"this run has {readers}: the shards would be dealt out differently. Resume "
                             f"with loader.readers={state['count']}")
        self.count = readers
        saved = dict((state or {}).get("readers", {}))
        self.loaders = [make_reader(r, readers, global_rows // readers, saved.get(str(r)))
                        for r in self.ids]

    @classmethod
    def from_config(cls, cfg, split: str, global_rows: int, *, shuffle: bool = True,
                    state: Mapping | None = None, readers: int | None = None) -> GlobalBatches:
        """Readers of ``cfg.data.out_dir`` / ``split`` as ``cfg.loader`` says (``readers``
        overrides ``loader.readers``; 0 = one per process)."""
        import jax

        from tml.data_pipelines.loader import ShardLoader

        lc = cfg.loader

        def make_reader(index, count, rows, reader_state):
            return ShardLoader(cfg.data.out_dir, split=split, row_length=lc.row_length,
                               max_patches=lc.max_patches_per_row, batch_size=rows, align=lc.align,
                               seed=lc.seed, shuffle=shuffle, workers=lc.workers,
                               process_index=index, process_count=count, state=reader_state)

        return cls(make_reader, global_rows=global_rows, readers=lc.readers if readers is None else readers,
                   process_index=jax.process_index(), process_count=jax.process_count(), state=state)

    def state(self) -> dict:
        """Where each of this process's readers resumes (JSON-able)."""
        return {"count": self.count,
                "readers": {str(r): ld.state().to_dict() for r, ld in zip(self.ids, self.loaders)}}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        its = [iter(ld) for ld in self.loaders]
        while True:
            parts = [next(it).as_dict() for it in its]
            yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def merge_states(per_process: list) -> dict:
    """Every process's saved :meth:`GlobalBatches.state` → one state for any process count
    (each reader's position is kept under its own index)."""
    readers: dict = {}
    count = None
    for st in per_process:
        if st is not None:
            if "readers" not in st:
                raise ValueError("the checkpoint's loader state was not saved by GlobalBatches "
                                 "(no per-reader positions); resume with the same number of processes")
            readers |= st["readers"]
            count = st.get("count", count)
    return {"count": count, "readers": readers}
