"""Bad shards during training: every kind of damage is one clear :class:`CorruptShardError`
(naming the shard, what is wrong and how to rewrite it), raised when the loader first needs
the bad shard — in-process and from torch workers alike — and `tml data build` rewrites it."""

import hashlib
import io
import json
import shutil
import tarfile
from types import SimpleNamespace

import pytest

from tests.data_pipelines.test_shards_loader import SOURCE, batches, jobs, loader, same_batches
from tml.data_pipelines import loader as loader_mod
from tml.data_pipelines.loader import CorruptShardError, decode_shard
from tml.data_pipelines.shards import build_shards

BAD = "train-00001.tar"  # the second shard: unshuffled, its batches come after train-00000's


def three_shards():
    return jobs()[:3]  # 12 toy conversations, 4 per shard


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    build_shards(three_shards(), out, workers=1, source=SOURCE, progress=False)
    return out


@pytest.fixture
def corpus(clean, tmp_path):
    """A private copy of the clean corpus, to damage."""
    out = tmp_path / "corpus"
    shutil.copytree(clean, out)
    return out


def manifest_entry(out, name=BAD) -> dict:
    return next(s for s in json.loads((out / "manifest.json").read_text())["shards"] if s["name"] == name)


def read_all(out, workers=0):
    """Every batch up to the error (the loader is infinite, so it must raise)."""
    ld = loader(out, shuffle=False, batch_size=1, workers=workers)
    got = []
    with pytest.raises(CorruptShardError) as err:
        for b in ld:
            got.append((b, ld.state()))
    return got, ld.state(), err.value


def assert_clear(err: CorruptShardError, out, *fragments):
    msg = str(err)
    assert msg.startswith(f"corrupt shard {out / BAD}: "), msg
    assert err.path == str(out / BAD)
    assert "tml data build" in msg and f"data.out_dir={out}" in msg
    assert "Traceback" not in msg and "DataLoader worker" not in msg
    for f in fragments:
        assert f in msg, (f, msg)


def rewrite_as_built(out, name, data: bytes):
    """Replace a shard and record it in its sidecar and the manifest, as if built this way."""
    (out / name).write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    side = out / name.replace(".tar", ".stats.json")
    for path, entries in ((side, None), (out / "manifest.json", "shards")):
        obj = json.loads(path.read_text())
        for entry in (obj[entries] if entries else [obj]):
            if entry["name"] == name:
                entry.update(sha256=sha, bytes=len(data))
        path.write_text(json.dumps(obj))


def edit_tar(data: bytes, edit) -> bytes:
    """A copy of a tar with ``edit(member, payload) -> payload`` applied to each file."""
    src = tarfile.open(fileobj=io.BytesIO(data))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src:
            payload = edit(m, src.extractfile(m).read())
            m.size = len(payload)
            dst.addfile(m, io.BytesIO(payload))
    return buf.getvalue()


def test_truncated_shard(corpus):
    data = (corpus / BAD).read_bytes()
    (corpus / BAD).write_bytes(data[: len(data) // 2])
    _, _, err = read_all(corpus)
    assert_clear(err, corpus, f"truncated: {len(data) // 2:,} bytes on disk, {len(data):,} in manifest.json")


def test_flipped_byte_in_the_middle(corpus):
    data = bytearray((corpus / BAD).read_bytes())
    data[len(data) // 2] ^= 0x01
    (corpus / BAD).write_bytes(bytes(data))
    expected, actual = manifest_entry(corpus)["sha256"], hashlib.sha256(data).hexdigest()
    _, _, err = read_all(corpus)
    assert_clear(err, corpus, "sha256 mismatch", f"expected {expected[:16]}", f"actual {actual[:16]}")


def test_missing_shard_file(corpus):
    (corpus / BAD).unlink()
    _, _, err = read_all(corpus)
    assert_clear(err, corpus, "the file is missing")


@pytest.mark.parametrize("member, garbage, says", [
    ("meta.json", b"{not json", "member 'toy-0-00004.meta.json' does not decode (JSONDecodeError"),
    ("dmel.npy", b"\x93NUMPY\x07garbage", "member 'toy-0-00004.dmel.npy' does not decode (ValueError"),
    ("dmel.npy", b"", "member 'toy-0-00004.dmel.npy' does not decode (EOFError"),
])
def test_garbage_member(corpus, member, garbage, says):
    """Garbage the build itself wrote (the sha256 matches): named down to the member."""
    bad = edit_tar((corpus / BAD).read_bytes(),
                   lambda m, b: garbage if m.name == f"toy-0-00004.{member}" else b)
    rewrite_as_built(corpus, BAD, bad)
    _, _, err = read_all(corpus)
    assert_clear(err, corpus, says, "sha256 matches manifest.json", f"delete {corpus / BAD}")


@pytest.mark.parametrize("name, says", [
    ("toy-0-00005meta_json", "undecodable member name 'toy-0-00005meta_json' is not <key>.<ext>"),
    ("toy-0-00005\udcff.meta.json", "undecodable member name 'toy-0-00005\\udcff.meta.json' is not UTF-8"),
    ("toy-0-00005.meta_json", "sample 'toy-0-00005' has no meta.json (its members: ['toy-0-00005.audio.flac', "
                              "'toy-0-00005.dmel.npy', 'toy-0-00005.meta_json'])"),
])
def test_undecodable_member_name(corpus, name, says):
    def rename(m, b):
        if m.name == "toy-0-00005.meta.json":
            m.name = name
        return b

    rewrite_as_built(corpus, BAD, edit_tar((corpus / BAD).read_bytes(), rename))
    _, _, err = read_all(corpus)
    assert_clear(err, corpus, says)
    str(err).encode("utf-8")  # printable


def test_without_a_sha256_a_truncated_tar_is_still_named(corpus):
    data = (corpus / BAD).read_bytes()
    (corpus / BAD).write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(CorruptShardError, match=r"train-00001\.tar: not a readable tar \(ReadError"):
        decode_shard(corpus / BAD, None)


def test_error_comes_after_every_good_batch_and_keeps_the_last_good_state(clean, corpus):
    """The bad shard fails when its first batch is due: everything before it is the clean
    run's, and the loader state (what a checkpoint records) is still the last good batch's."""
    good = loader(clean, shuffle=False, batch_size=1)
    it = iter(good)
    expected = [next(it) for _ in range(40)]
    (corpus / BAD).write_bytes((corpus / BAD).read_bytes()[:-512])
    got, state, _ = read_all(corpus)
    assert got and same_batches([b for b, _ in got], expected[: len(got)])
    assert state == got[-1][1]
    assert state.shard_pos == 0  # still in train-00000: nothing of the bad shard was consumed


def test_sha256_is_checked_once_per_shard_open(clean, monkeypatch):
    calls = []
    monkeypatch.setattr(loader_mod, "hashlib", SimpleNamespace(
        sha256=lambda data: calls.append(len(data)) or hashlib.sha256(data)))
    opened = []
    real_pieces = loader_mod.shard_pieces
    monkeypatch.setattr(loader_mod, "shard_pieces", lambda path, *a, **k: opened.append(path.name)
                        or real_pieces(path, *a, **k))
    batches(loader(clean, batch_size=1), 30)  # more than one epoch
    assert len(opened) > 3 and len(calls) == len(opened)
    assert calls == [(clean / name).stat().st_size for name in opened]


def test_a_worker_error_reaches_the_main_process_unchanged(clean, corpus):
    """With a torch worker (spawn) the main process raises the same CorruptShardError, with
    the same message as in-process, after the same good batches."""
    data = bytearray((corpus / BAD).read_bytes())
    data[len(data) // 3] ^= 0xFF
    (corpus / BAD).write_bytes(bytes(data))
    in_process, state0, err0 = read_all(corpus, workers=0)
    with_worker, state1, err1 = read_all(corpus, workers=1)
    assert type(err1) is CorruptShardError and str(err1) == str(err0) and err1.path == err0.path
    assert_clear(err1, corpus, "sha256 mismatch")
    assert same_batches([b for b, _ in with_worker], [b for b, _ in in_process]) and state1 == state0


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "sidecar"])
def test_build_rewrites_exactly_the_bad_shard(clean, corpus, damage):
    """What the error message promises: re-running the build rewrites the damaged shard
    (byte-identical to the original) and nothing else; the loader then reads it again."""
    before = {p.name: p.read_bytes() for p in corpus.glob("*.tar")}
    p = corpus / BAD
    if damage == "flip":
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    elif damage == "truncate":
        p.write_bytes(p.read_bytes()[:1000])
    elif damage == "missing":
        p.unlink()
    else:  # the tar is fine but its sidecar is garbage: rewritten too (same bytes)
        (corpus / BAD.replace(".tar", ".stats.json")).write_text("{garbage")
    mtimes = {q.name: q.stat().st_mtime_ns for q in corpus.glob("*.tar") if q.name != BAD}
    res = build_shards(three_shards(), corpus, workers=1, source=SOURCE, progress=False)
    assert (res.written, res.skipped) == (1, 2)
    assert {q.name: q.read_bytes() for q in corpus.glob("*.tar")} == before
    assert {q.name: q.stat().st_mtime_ns for q in corpus.glob("*.tar") if q.name != BAD} == mtimes
    assert (corpus / "manifest.json").read_text() == (clean / "manifest.json").read_text()
    assert same_batches(batches(loader(corpus, shuffle=False), 8), batches(loader(clean, shuffle=False), 8))
