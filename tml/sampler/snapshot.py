"""Engine snapshots: the live sessions saved between ticks, restored into a new engine
that continues bit for bit.

    engine.snapshot("runs/snap")                 # between ticks (no micro-turn pending)
    fresh = Engine(model, max_sessions=8, ...)   # a new engine, fresh pool (another process)
    fresh.restore("runs/snap")                   # same session ids, same history
    fresh.append(sid, inputs); fresh.tick()      # == what the old engine would have returned

**What is saved, and why the KV pages rather than a re-prefill.** For every live session:
its seed, sampling parameters, typed context, the committed micro-turns (inputs and
outputs), the KV length before each micro-turn and the audio tail then (so rollback
stays exact after a restore), its outputs (tokens, positions, log-probs, speech frames,
waveforms), and the contents of **its own pages only** (``pool.pages(sid)``, raw bits).
Restoring copies those pages into pages of the new pool (paging changes no bits: a page
holds whole attention splits). Re-prefilling the history instead would be exact only in
``batch_invariant`` mode (a prefill chunked differently from the original ticks gives
other K/V bits in ``standard``, ``tests/sampler/test_alignment.py``) and costs a forward
pass over the whole history — 10 minutes of a session is ~3,000 micro-turns, ~130k tokens
— while copying pages is exact in every mode and costs only the copy. The snapshot
therefore holds no weights: the restoring engine must hold the same ones (checked by a
digest of the parameters).

**On disk.** ``<dir>/sessions-<sha256[:16]>.npz`` (every array, raw bits; named by its
content) then ``<dir>/snapshot.json`` (the manifest: format version, model config and its
fingerprint, KV dtype and page size, weights digest, the npz's sha256, per-session
scalars), each written atomically (:func:`tml.files.atomic_write_bytes`). The manifest is
written last and names its npz by hash, so a reader (or a crash mid-save) sees the old
snapshot or the new one, never a mix; npz files no manifest names are then removed.

Errors (:class:`SnapshotError`, a ``ValueError``): no snapshot at the path, a corrupt or
truncated file (sha256 / JSON / npz), another format version, another model config (the
differing keys named), another KV dtype, page size or weights, a micro-turn pending at
save time, a restoring engine that already serves sessions or cannot hold them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from tml.files import atomic_write_bytes, atomic_write_json
from tml.sampler.sampling import SamplingParams
from tml.sampler.session import Session, TurnOutput
from tml.stream import MicroTurn
from tml.train.checkpoint.fingerprint import config_diff, config_fingerprint, config_to_dict, flatten_config

if TYPE_CHECKING:
    from tml.sampler.engine import Engine

FORMAT_VERSION = 1
MANIFEST = "snapshot.json"


class SnapshotError(ValueError):
    """A snapshot that cannot be saved or restored; the message says what to do."""


# ------------------------------------------------------------------ helpers
def weights_digest(state) -> str:
    """sha256 over every parameter's dtype, shape and raw bytes (in tree order)."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(state):
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _raw(a: np.ndarray) -> np.ndarray:
    """The raw bits of ``a`` as unsigned ints of its item size (bfloat16 has no npz dtype)."""
    return np.ascontiguousarray(a).view(np.dtype(f"u{a.dtype.itemsize}"))


def _concat(parts: list[np.ndarray], shape_tail: tuple[int, ...], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, *shape_tail), dtype)


def _split(a: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    return np.split(a, np.cumsum(counts)[:-1]) if counts else []


# ------------------------------------------------------------------ session <-> (json, arrays)
def _session_record(s: Session, k_pages: np.ndarray, v_pages: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    p = f"s{s.sid}."
    turns, outs = s.turns, s.outputs
    video_counts = [-1 if t.video is None else len(t.video) for t in turns]
    n_out = [len(o.tokens) for o in outs]
    n_frames = [len(o.speech) for o in outs]
    wave_len = [-1 if o.waveform is None else len(o.waveform) for o in outs]
    arrays = {
        p + "k": _raw(k_pages), p + "v": _raw(v_pages),
        p + "tails": np.stack(s.tails).astype(np.float32),
        p + "user_audio": np.asarray([t.user_audio for t in turns], np.uint8).reshape(-1, 4, 80),
        p + "video": _concat([t.video for t in turns if t.video is not None], (2, 40, 40, 3), np.uint8),
        p + "tokens": _concat([o.tokens for o in outs], (), np.int32),
        p + "positions": _concat([o.positions for o in outs], (), np.int32),
        p + "logprobs": _concat([o.logprobs for o in outs], (), np.float32),
        p + "speech": _concat([o.speech for o in outs], (80,), np.uint8),
        p + "channels": _concat([o.speech_channel_logprobs for o in outs], (80,), np.float32),
        p + "waveform": _concat([o.waveform for o in outs if o.waveform is not None], (), np.float32),
    }
    record = {
        "sid": s.sid, "seed": s.seed, "sampling": dataclasses.asdict(s.sampling), "context": s.context,
        "starts": list(s.starts), "video_counts": video_counts, "n_out": n_out, "n_frames": n_frames,
        "wave_len": wave_len, "n_pages": int(k_pages.shape[1]),
        "turns": [{"typed": t.typed, "background": t.background, "model_text": t.model_text,
                   "control": list(t.control), "speaks": t.model_speech is not None} for t in turns],
        "outputs": [{"micro_turn": o.micro_turn, "text": o.text, "text_bytes": o.text_bytes.hex(),
                     "control": list(o.control), "forced_end": bool(o.forced_end)} for o in outs],
    }
    return record, arrays


def _session_from(record: dict, z) -> tuple[Session, np.ndarray, np.ndarray]:
    p = f"s{record['sid']}."
    user_audio = z[p + "user_audio"]
    videos = _split(z[p + "video"], [max(c, 0) for c in record["video_counts"]])
    tokens, positions, logprobs = (_split(z[p + k], record["n_out"]) for k in ("tokens", "positions", "logprobs"))
    speech, channels = (_split(z[p + k], record["n_frames"]) for k in ("speech", "channels"))
    waves = _split(z[p + "waveform"], [max(n, 0) for n in record["wave_len"]])
    turns = []
    for t, tr in enumerate(record["turns"]):
        turns.append(MicroTurn(user_audio=user_audio[t], video=videos[t] if record["video_counts"][t] >= 0 else None,
                               typed=tr["typed"], background=tr["background"], model_text=tr["model_text"],
                               model_speech=speech[t] if tr["speaks"] else None, control=tuple(tr["control"])))
    outputs = []
    for t, o in enumerate(record["outputs"]):
        outputs.append(TurnOutput(micro_turn=o["micro_turn"], text=o["text"], text_bytes=bytes.fromhex(o["text_bytes"]),
                                  speech=speech[t], waveform=waves[t] if record["wave_len"][t] >= 0 else None,
                                  control=tuple(o["control"]), tokens=tokens[t], positions=positions[t],
                                  logprobs=logprobs[t], speech_channel_logprobs=channels[t],
                                  forced_end=o["forced_end"]))
    s = Session(record["sid"], record["seed"], SamplingParams(**record["sampling"]).validate(), record["context"],
                turns=turns, outputs=outputs, starts=list(record["starts"]),
                tails=[np.asarray(x, np.float32) for x in z[p + "tails"]])
    return s, z[p + "k"], z[p + "v"]


# ------------------------------------------------------------------ save / restore
def _identity(engine: "Engine") -> dict:
    return {"model_config": config_to_dict(engine.cfg), "config_fingerprint": config_fingerprint(engine.cfg),
            "kv_dtype": str(engine.kv_dtype), "page_size": engine.pool.page_size,
            "kv_page_shape": list(engine.k[0].shape[1:]), "n_layers": len(engine.k),
            "vocab_size": engine.tokenizer.vocab_size, "weights_digest": engine.weights_digest()}


def save(engine: "Engine", directory: str | os.PathLike) -> Path:
    """Save every live session of ``engine`` (between ticks) into ``directory`` → the
    manifest's path. See the module docstring for what is saved."""
    pending = [s.sid for s in engine._sessions.values() if s.pending is not None]
    if pending:
        raise SnapshotError(f"sessions {pending} have a micro-turn waiting: snapshot between ticks "
                            "(call tick() first)")
    directory = Path(directory)
    records, arrays = [], {}
    for s in engine._sessions.values():
        pages = np.asarray(engine.pool.pages(s.sid), np.int32)
        k, v = engine.read_pages(pages)
        rec, arr = _session_record(s, k, v)
        records.append(rec)
        arrays.update(arr)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    npz_name = f"sessions-{sha[:16]}.npz"
    atomic_write_bytes(directory / npz_name, data)
    manifest = {"format_version": FORMAT_VERSION, **_identity(engine), "npz": npz_name, "npz_sha256": sha,
                "next_id": engine._next_id, "sessions": records}
    atomic_write_json(directory / MANIFEST, manifest)
    for old in directory.glob("sessions-*.npz"):
        if old.name != npz_name:
            old.unlink(missing_ok=True)
    return directory / MANIFEST


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise SnapshotError(f"no engine snapshot at {directory} ({MANIFEST} missing): save one with "
                            "engine.snapshot(dir) first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{path} is corrupt ({e}): save the snapshot again") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise SnapshotError(f"{path} has snapshot format version {got!r}, this code reads {FORMAT_VERSION}: "
                            "save the snapshot again with this version of tml")
    return manifest


def _check_identity(manifest: dict, engine: "Engine", directory) -> None:
    mine = _identity(engine)
    if manifest.get("config_fingerprint") != mine["config_fingerprint"]:
        diff = config_diff(flatten_config(manifest.get("model_config", {})), flatten_config(mine["model_config"]))
        keys = ", ".join(f"model.{k}: snapshot {a!r} vs engine {b!r}" for k, a, b in diff[:8])
        raise SnapshotError(f"the snapshot at {directory} comes from another model config ({keys}): restore it "
                            "into an engine built on that model")
    for key, what in (("kv_dtype", "KV dtype (model.dtype)"), ("page_size", "page_size"),
                      ("kv_page_shape", "KV page shape"), ("n_layers", "layer count"),
                      ("vocab_size", "tokenizer vocabulary")):
        if manifest.get(key) != mine[key]:
            raise SnapshotError(f"the snapshot at {directory} has {what} {manifest.get(key)!r}, this engine "
                                f"{mine[key]!r}: build the engine as the one that saved it")
    if manifest.get("weights_digest") != mine["weights_digest"]:
        raise SnapshotError(f"the snapshot at {directory} was taken with other weights (its KV pages were "
                            "computed by them): restore it into an engine holding the same parameters "
                            "(the same checkpoint step)")


def restore(engine: "Engine", directory: str | os.PathLike) -> list[int]:
    """Load the sessions saved in ``directory`` into ``engine`` (which serves none yet)
    → their ids (the saved ones). Everything is checked before the engine changes."""
    if engine._sessions:
        raise SnapshotError(f"restore into an engine that serves no sessions (this one serves "
                            f"{sorted(engine._sessions)}): build a new Engine")
    manifest = read_manifest(directory)
    _check_identity(manifest, engine, directory)
    path = Path(directory) / manifest["npz"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"{path} (named by {MANIFEST}) is missing: the snapshot is incomplete, save it "
                            "again") from None
    if hashlib.sha256(data).hexdigest() != manifest["npz_sha256"]:
        raise SnapshotError(f"{path} is corrupt (sha256 differs from {MANIFEST}'s): save the snapshot again")
    try:
        with np.load(io.BytesIO(data)) as z:
            arrays = {name: z[name] for name in z.files}
        loaded = [_session_from(rec, arrays) for rec in manifest["sessions"]]
    except (KeyError, ValueError, IndexError, TypeError, zipfile.BadZipFile) as e:
        raise SnapshotError(f"{path} does not hold what {MANIFEST} describes ({type(e).__name__}: {e}): "
                            "save the snapshot again") from e
    if len(loaded) > engine.max_sessions:
        raise SnapshotError(f"the snapshot holds {len(loaded)} sessions, this engine serves max_sessions="
                            f"{engine.max_sessions}: build it with more")
    kv_dtype = engine.kv_dtype
    opened = []
    try:
        for s, k, v in loaded:
            engine.pool.open(s.sid)
            opened.append(s.sid)
            engine.pool.ensure(s.sid, s.length)
            pages = np.asarray(engine.pool.pages(s.sid), np.int32)
            if len(pages) != k.shape[1]:
                raise SnapshotError(f"session {s.sid} holds {s.length} KV slots in {k.shape[1]} saved pages, "
                                    f"not {len(pages)}: the snapshot is inconsistent, save it again")
            engine.write_pages(pages, k.view(kv_dtype), v.view(kv_dtype))
    except BaseException:
        for sid in opened:
            engine.pool.close(sid)
        raise
    for s, _, _ in loaded:
        engine._sessions[s.sid] = s
    engine._next_id = max(engine._next_id, int(manifest["next_id"]))
    return [s.sid for s, _, _ in loaded]
