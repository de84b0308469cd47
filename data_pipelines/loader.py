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
* **Integrity.** Each time a shard is opened (once per shard per epoch, in the process
  that decodes it) its size and sha256 are checked against ``manifest.json`` before
  anything in it is decoded. A missing, truncated or altered shard, or a sample in it that
  does not decode, raises :class:`CorruptShardError` — also with torch workers, where the
  error crosses to the main process with its message unchanged — naming the shard, what is
  wrong and how to rewrite it. The error comes when the loader first needs the bad shard
  (workers prefetch, but hand results back in order), so the batches before it, and the
  loader state a checkpoint records, are those of a clean run.
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

from tml.stream import (SAMPLES_PER_MICRO_TURN, Conversation, Packer, PackedRows, Tokens, layout,
                        split_at_micro_turns, to_micro_turns)
from tml.stream.micro_turns import FRAMES_PER_MICRO_TURN, N_MELS
from tml.stream.packing import ATTENTION_SPLIT, check_align
from tml.data_pipelines.shards import MANIFEST


class CorruptShardError(RuntimeError):
    """A shard is missing, truncated, altered (sha256 mismatch) or holds a sample that does
    not decode. The message names the shard, what is wrong and what to do; ``path`` is the
    shard. Constructible from the message alone, as torch's worker re-raise needs."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


def _rebuild_hint(path: Path) -> str:
    return (f"Rewrite it: re-run `tml data build` with the same data settings "
            f"(data.out_dir={path.parent}); the build resumes, checks the sha256 of every "
            f"existing shard and rewrites only the missing or bad ones.")


def _corrupt(path: Path, problem: str, hint: str | None = None) -> CorruptShardError:
    return CorruptShardError(f"corrupt shard {path}: {problem}. {hint or _rebuild_hint(path)}", str(path))


# what np.load / json / tarfile raise on garbage input
_DECODE_ERRORS = (ValueError, KeyError, IndexError, TypeError, EOFError, OSError, tarfile.TarError)


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
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): re-run `tml data build` with the same "
                         f"data settings (data.out_dir={path.parent}) to rewrite it") from e


class MemberNameError(ValueError):
    """A tar member whose name is not a UTF-8 ``<key>.<ext>``."""


def read_tar_samples(data: bytes) -> list[dict[str, bytes]]:
    """webdataset samples of a tar: files ``<key>.<ext>`` grouped by key, in order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            try:
                member.name.encode("utf-8")  # tarfile keeps undecodable bytes as surrogates
            except UnicodeEncodeError:
                raise MemberNameError(f"member name {member.name!r} is not UTF-8") from None
            key, _, ext = member.name.partition(".")
            if not key or not ext:
                raise MemberNameError(f"member name {member.name!r} is not <key>.<ext>")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def verify_shard(path: Path, sha256: str | None, size: int | None = None) -> bytes:
    """The bytes of a shard, after checking they are the ones ``manifest.json`` records
    (size first, so a truncated file is named as such, then sha256)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _corrupt(path, "the file is missing (manifest.json lists it)") from None
    except OSError as e:
        raise _corrupt(path, f"the file cannot be read ({type(e).__name__}: {e})") from e
    if size is not None and len(data) != size:
        what = "truncated" if len(data) < size else "longer than built"
        raise _corrupt(path, f"{what}: {len(data):,} bytes on disk, {size:,} in manifest.json")
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise _corrupt(path, f"sha256 mismatch (flipped bytes or a modified file): expected "
                                 f"{sha256[:16]}… (manifest.json), actual {actual[:16]}…")
    return data


def _written_this_way_hint(path: Path) -> str:
    """What to do about a shard whose bytes match manifest.json but do not decode."""
    return (f"Its sha256 matches manifest.json, so the build wrote it this way: delete {path} "
            f"and re-run `tml data build` with the same data settings (data.out_dir={path.parent}) "
            f"to rewrite it; if it fails again the same way, the source data or the builder is at fault.")


def decode_shard(path: Path, sha256: str | None, size: int | None = None,
                 conversations: int | None = None) -> list[tuple[Conversation, np.ndarray]]:
    """Read one tar shard into (conversation, uint8 [2, 4n, 80] dMel of user and model).

    The shard is verified first (:func:`verify_shard`); this and any sample that does not
    decode raise :class:`CorruptShardError`. The audio is not decoded (the dMel is
    precomputed): the conversation carries silent placeholder waveforms of the right length."""
    data = verify_shard(path, sha256, size)
    hint = _written_this_way_hint(path) if sha256 is not None else None
    try:
        samples = read_tar_samples(data)
    except MemberNameError as e:
        raise _corrupt(path, f"undecodable {e}", hint) from None
    except _DECODE_ERRORS as e:
        raise _corrupt(path, f"not a readable tar ({type(e).__name__}: {e})", hint) from e
    convs = []
    for sample in samples:
        key = sample["__key__"]
        missing = [m for m in ("meta.json", "dmel.npy") if m not in sample]
        if missing:
            names = sorted(f"{key}.{ext}" for ext in sample if ext != "__key__")
            raise _corrupt(path, f"sample {key!r} has no {' or '.join(missing)} (its members: {names})",
                           hint)
        member = "meta.json"
        try:
            meta = json.loads(sample["meta.json"])
            n = meta["n_micro_turns"]
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"n_micro_turns={n!r}")
            member = "dmel.npy"
            dm = np.load(io.BytesIO(sample["dmel.npy"]), allow_pickle=False)
            need = (2, n * FRAMES_PER_MICRO_TURN, N_MELS)
            if dm.dtype != np.uint8 or dm.shape != need:
                raise ValueError(f"{dm.dtype} {dm.shape}, expected uint8 {need} for {n} micro-turns")
            member = "video.npy"
            video = (np.load(io.BytesIO(sample["video.npy"]), allow_pickle=False)
                     if "video.npy" in sample else None)
            member = "meta.json"
            # audio is not decoded: a placeholder of the right length keeps n_micro_turns
            silent = np.zeros(n * SAMPLES_PER_MICRO_TURN, np.float32)
            conv = Conversation.from_json(meta, silent, silent, video)
        except _DECODE_ERRORS as e:
            raise _corrupt(path, f"member {key + '.' + member!r} does not decode "
                                 f"({type(e).__name__}: {e})", hint) from e
        convs.append((conv, dm))
    if conversations is not None and len(convs) != conversations:
        raise _corrupt(path, f"holds {len(convs)} samples, manifest.json says {conversations}", hint)
    return convs


def shard_pieces(path: Path, sha256: str | None, row_length: int, max_patches: int,
                 perm_seed: tuple | None, size: int | None = None,
                 conversations: int | None = None) -> list[list[Tokens]]:
    """One shard → its conversations (permuted by ``perm_seed``) → pieces per conversation."""
    convs = decode_shard(path, sha256, size, conversations)
    order = (np.random.default_rng(list(perm_seed)).permutation(len(convs))
             if perm_seed is not None else np.arange(len(convs)))
    out = []
    for i in order:
        conv, dm = convs[i]
        try:
            turns = to_micro_turns(conv, user_dmel=dm[0], model_dmel=dm[1])
        except _DECODE_ERRORS as e:  # metadata that decodes but does not make sense
            raise _corrupt(path, f"sample {conv.id!r} is inconsistent ({type(e).__name__}: {e})",
                           _written_this_way_hint(path) if sha256 is not None else None) from e
        out.append(split_at_micro_turns(layout(turns), row_length, max_patches))
    return out


class _EpochShards:
    """Map-style dataset: global index i → pieces of the i-th shard in epoch-major order.

    In a torch worker (``in_worker``) a :class:`CorruptShardError` is returned rather than
    raised, so the main process can raise it with its own message: torch would re-raise it
    as a new exception whose message is the worker's whole traceback."""

    def __init__(self, loader: "ShardLoader", in_worker: bool = False):
        self.loader = loader
        self.in_worker = in_worker

    def __getitem__(self, i: int):
        epoch, pos = divmod(i, self.loader.shards_per_epoch)
        name, sha = self.loader.epoch_shards(epoch)[pos]
        seed = (self.loader.seed, epoch, pos) if self.loader.shuffle else None
        size, conversations = self.loader.shard_info.get(name, (None, None))
        try:
            return shard_pieces(self.loader.data_dir / name, sha, self.loader.row_length,
                                self.loader.max_patches, seed, size, conversations)
        except CorruptShardError as e:
            if self.in_worker:
                return e
            raise

    def __len__(self):  # effectively infinite; DataLoader needs a length only for len()
        return 2**62


def _identity(x):
    return x


def split_conversations(manifest: dict, split: str) -> int:
    """How many conversations the corpus holds in ``split`` (0 when it has no such shards)."""
    return sum(s["conversations"] for s in manifest["shards"] if s["split"] == split)


def empty_split_message(data_dir: Path, split: str) -> str:
    """Why a split cannot be read when it holds no conversation, and what to do."""
    if split == "eval":
        fix = ("build the corpus with a held-out split (data.eval_conversations > 0, e.g. "
               "`tml data build data.eval_conversations=32 ...`), or train without "
               "evaluation (train.eval_every=0)")
    else:
        fix = f"check the corpus build (its rejects.jsonl) and rebuild it with conversations in {split!r}"
    return f"split {split!r} of {data_dir} has no conversations (0 in its manifest): {fix}"


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
        align: int = ATTENTION_SPLIT,
        seed: int = 0,
        shuffle: bool = True,
        workers: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        state: LoaderState | dict | None = None,
    ):
        self.data_dir = Path(data_dir)
        manifest = read_manifest(self.data_dir)
        check_align(align, row_length)
        shards = [(s["name"], s["sha256"]) for s in manifest["shards"]
                  if s["split"] == split and s["conversations"] > 0]
        if not shards:
            raise ValueError(empty_split_message(self.data_dir, split))
        if len(shards) < process_count:
            raise ValueError(
                f"split {split!r} of {self.data_dir} has {len(shards)} non-empty shards, fewer than "
                f"the {process_count} processes; rebuild with a smaller data.conversations_per_shard"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.shards = sorted(shards)
        # size and sample count of each shard, checked when it is opened
        self.shard_info = {s["name"]: (s.get("bytes"), s.get("conversations"))
                           for s in manifest["shards"] if s["split"] == split}
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
        if self.workers <= 0:
            dataset = _EpochShards(self)
            for i in count(start):
                yield dataset[i]
        else:
            import torch.utils.data as tud

            dl = tud.DataLoader(
                _EpochShards(self, in_worker=True), batch_size=None, sampler=count(start),
                num_workers=self.workers, collate_fn=_identity, prefetch_factor=2,
                multiprocessing_context="spawn", persistent_workers=True,
            )
            # torch hands results back in index order, so a bad shard is raised when its
            # turn comes, after every batch before it, as without workers
            for shard in dl:
                if isinstance(shard, CorruptShardError):
                    raise CorruptShardError(str(shard), shard.path)
                yield shard

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
