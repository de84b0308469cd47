"""Shards → decoded conversations → micro-turn tokens → packed batches.

Deterministic for a seed, resumable to the batch, disjoint across processes:

* **Order.** Epoch *e* permutes the split's shards with ``rng(seed, e)``; process *p* of
  *P* takes every *P*-th shard of that order (so processes read disjoint shards); the
  conversations of a shard are permuted with ``rng(seed, e, shard)``. Each conversation is
  laid out (:func:`tml.stream.layout`) and split at micro-turn boundaries into pieces,
  which the greedy :class:`~tml.stream.Packer` packs into rows.
* **State.** The rows depend only on the order of the pieces, so the loader's state is
  the coordinates ``(epoch, shard_pos, sample_pos, piece_pos)`` of the first piece of the
  row being filled. :meth:`ShardLoader.state` after a batch, given back to a new loader,
  makes it yield exactly the batches the old one would have yielded next.
* **Workers.** With ``workers > 0`` a torch DataLoader decodes and lays out whole shards in
  worker processes, in order, so the batches are the same for any number of workers.
* **Integrity.** Every shard's sha256 is checked against ``manifest.json``; a corrupt or
  missing shard is an error that names it and says how to rebuild.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass
from itertools import count
from pathlib import Path
from typing import Iterator

import numpy as np

from tml.stream import Conversation, Packer, PackedRows, Tokens, layout, split_at_micro_turns, to_micro_turns
from tml.data_pipelines.shards import MANIFEST


class CorruptShardError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoaderState:
    """Where the next batch starts; JSON-serialisable (saved with checkpoints)."""

    epoch: int = 0
    shard_pos: int = 0
    sample_pos: int = 0
    piece_pos: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        return cls(**d)


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}: build the corpus with `tml data build`")
    return json.loads(path.read_text())


def read_tar_samples(data: bytes) -> list[dict[str, bytes]]:
    """webdataset samples of a tar: files ``<key>.<ext>`` grouped by key, in order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def decode_shard(path: Path, sha256: str | None) -> list[tuple[Conversation, np.ndarray]]:
    """Read one tar shard into (conversation, uint8 [2, 4n, 80] dMel of user and model).

    The audio is not decoded (the dMel is precomputed): the conversation carries silent
    placeholder waveforms of the right length."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptShardError(f"cannot read shard {path}: {e}. Rebuild with `tml data build`.") from e
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptShardError(
            f"shard {path} does not match the sha256 in manifest.json (corrupt or modified); "
            f"delete it and re-run `tml data build` with the same data.out_dir to rewrite it"
        )
    convs = []
    try:
        samples = read_tar_samples(data)
    except (tarfile.TarError, ValueError, KeyError) as e:
        raise CorruptShardError(f"shard {path} is not a readable tar ({e}); rebuild it") from e
    for sample in samples:
        meta = json.loads(sample["meta.json"])
        dm = np.load(io.BytesIO(sample["dmel.npy"]))
        video = np.load(io.BytesIO(sample["video.npy"])) if "video.npy" in sample else None
        n = meta["n_micro_turns"]
        # audio is not decoded: a placeholder of the right length keeps n_micro_turns
        silent = np.zeros(n * 3200, np.float32)
        convs.append((Conversation.from_json(meta, silent, silent, video), dm))
    return convs


def shard_pieces(path: Path, sha256: str | None, row_length: int, max_patches: int,
                 perm_seed: tuple | None) -> list[list[Tokens]]:
    """One shard → its conversations (permuted by ``perm_seed``) → pieces per conversation."""
    convs = decode_shard(path, sha256)
    order = (np.random.default_rng(list(perm_seed)).permutation(len(convs))
             if perm_seed is not None else np.arange(len(convs)))
    out = []
    for i in order:
        conv, dm = convs[i]
        seq = layout(to_micro_turns(conv, user_dmel=dm[0], model_dmel=dm[1]))
        out.append(split_at_micro_turns(seq, row_length, max_patches))
    return out


class _EpochShards:
    """Map-style dataset: global index i → pieces of the i-th shard in epoch-major order."""

    def __init__(self, loader: "ShardLoader"):
        self.loader = loader

    def __getitem__(self, i: int):
        epoch, pos = divmod(i, self.loader.shards_per_epoch)
        name, sha = self.loader.epoch_shards(epoch)[pos]
        seed = (self.loader.seed, epoch, pos) if self.loader.shuffle else None
        return shard_pieces(self.loader.data_dir / name, sha, self.loader.row_length,
                            self.loader.max_patches, seed)

    def __len__(self):  # effectively infinite; DataLoader needs a length only for len()
        return 2**62


def _identity(x):
    return x


class ShardLoader:
    """Infinite iterator of :class:`PackedRows` batches of ``batch_size`` rows."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        split: str = "train",
        row_length: int = 1024,
        max_patches: int = 64,
        batch_size: int = 4,
        align: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        workers: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        state: LoaderState | dict | None = None,
    ):
        self.data_dir = Path(data_dir)
        manifest = read_manifest(self.data_dir)
        shards = [(s["name"], s["sha256"]) for s in manifest["shards"]
                  if s["split"] == split and s["conversations"] > 0]
        if len(shards) < process_count:
            raise ValueError(
                f"split {split!r} of {self.data_dir} has {len(shards)} non-empty shards, fewer than "
                f"the {process_count} processes; rebuild with a smaller data.conversations_per_shard"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.shards = sorted(shards)
        self.split, self.row_length, self.max_patches = split, row_length, max_patches
        self.batch_size, self.seed, self.shuffle, self.workers = batch_size, seed, shuffle, workers
        self.align = align
        self.process_index, self.process_count = process_index, process_count
        self.shards_per_epoch = len(self.shards) // process_count
        if isinstance(state, dict):
            state = LoaderState.from_dict(state)
        self._state = state or LoaderState()

    def epoch_shards(self, epoch: int) -> list[tuple[str, str]]:
        """This process's shards for ``epoch``, in reading order."""
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
                 if self.shuffle else np.arange(len(self.shards)))
        mine = order[self.process_index :: self.process_count][: self.shards_per_epoch]
        return [self.shards[i] for i in mine]

    def state(self) -> LoaderState:
        """Where the next batch starts."""
        return self._state

    def _shard_stream(self, start: int) -> Iterator[list[list[Tokens]]]:
        dataset = _EpochShards(self)
        if self.workers <= 0:
            for i in count(start):
                yield dataset[i]
        else:
            import torch.utils.data as tud

            dl = tud.DataLoader(
                dataset, batch_size=None, sampler=count(start), num_workers=self.workers,
                collate_fn=_identity, prefetch_factor=2, multiprocessing_context="spawn",
                persistent_workers=True,
            )
            yield from dl

    def __iter__(self) -> Iterator[PackedRows]:
        st = self._state
        packer = Packer(self.row_length, self.max_patches, align=self.align)
        rows: list[Tokens] = []
        row_start = st
        first = st.epoch * self.shards_per_epoch + st.shard_pos
        for i, shard in enumerate(self._shard_stream(first), start=first):
            epoch, shard_pos = divmod(i, self.shards_per_epoch)
            s0 = st.sample_pos if i == first else 0
            for sample_pos in range(s0, len(shard)):
                pieces = shard[sample_pos]
                p0 = st.piece_pos if (i == first and sample_pos == s0) else 0
                for piece_pos in range(p0, len(pieces)):
                    here = LoaderState(epoch, shard_pos, sample_pos, piece_pos)
                    if packer.empty:
                        row_start = here
                    for row in packer.add(pieces[piece_pos]):
                        rows.append(row)
                        row_start = here
                        if len(rows) == self.batch_size:
                            self._state = row_start
                            yield PackedRows.stack(rows)
                            rows = []
