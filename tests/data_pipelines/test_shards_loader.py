"""Shard writing (atomic, resumable, rejects) and the loader (deterministic, restorable)."""

import functools
import hashlib
import json

import numpy as np
import pytest

from tests.data_pipelines.toy_sources import crash_after, toy_slice
from tests.stream.toy_conversation import toy_conversation
from tml.data_pipelines.loader import CorruptShardError, LoaderState, ShardLoader
from tml.data_pipelines.shards import ShardJob, build_shards, quantize_pcm16
from tml.stream import to_micro_turns, unlayout

N, PER = 24, 4
SOURCE = {"source": "toy"}


def jobs(bad_every=0, split="train"):
    return [ShardJob(split, k, functools.partial(toy_slice, a, min(a + PER, N), bad_every))
            for k, a in enumerate(range(0, N, PER))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    res = build_shards(jobs(bad_every=7), out, workers=2, source=SOURCE, progress=False)
    return out, res


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(
        all(np.array_equal(x, y) for x, y in zip(p.as_dict().values(), q.as_dict().values()))
        for p, q in zip(a, b))


def test_manifest_counts_hashes_and_rejects(corpus):
    out, res = corpus
    m = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(l) for l in (out / "rejects.jsonl").read_text().splitlines()]
    bad_nan = [i for i in range(N) if i % 7 == 1]
    bad_file = [i for i in range(N) if i % 7 == 2]
    assert m["conversations"] == N - len(bad_nan) - len(bad_file) == m["splits"]["train"]["conversations"]
    assert m["rejects"] == len(rejects) == len(bad_nan) + len(bad_file)
    assert any("NaN" in r["reason"] and r["path"] == f"toy-0-{bad_nan[0]:05d}" for r in rejects)
    assert any(r["reason"] == "truncated file" and r["path"] == f"input-{bad_file[0]}.wav" for r in rejects)
    good = [toy_conversation(i) for i in range(N) if i not in bad_nan + bad_file]
    assert m["micro_turns"] == sum(c.n_micro_turns for c in good)
    assert m["hours"] == pytest.approx(sum(c.duration for c in good) / 3600)
    for s in m["shards"]:
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert not list(out.glob(".*.tmp"))


def test_rerun_resumes_and_rewrites_only_missing_shards(tmp_path):
    build_shards(jobs(), tmp_path, workers=1, source=SOURCE, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")}
    (tmp_path / "train-00002.tar").unlink()
    res = build_shards(jobs(), tmp_path, workers=1, source=SOURCE, progress=False)
    assert (res.written, res.skipped) == (1, len(before) - 1)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")} == before  # deterministic


def test_an_interrupted_build_leaves_no_half_shard_and_resumes(tmp_path):
    broken = jobs()
    broken[3] = ShardJob("train", 3, functools.partial(crash_after, 12, 16, 14))
    with pytest.raises(KeyboardInterrupt):
        build_shards(broken, tmp_path, workers=1, source=SOURCE, progress=False)
    assert not (tmp_path / "train-00003.tar").exists()
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "manifest.json").exists()
    res = build_shards(jobs(), tmp_path, workers=1, source=SOURCE, progress=False)
    assert res.written == len(jobs()) - 3
    assert json.loads((tmp_path / "manifest.json").read_text())["conversations"] == N


def test_a_different_source_in_the_same_folder_is_refused(tmp_path):
    build_shards(jobs()[:1], tmp_path, workers=1, source=SOURCE, progress=False)
    with pytest.raises(ValueError, match="another source"):
        build_shards(jobs()[:1], tmp_path, workers=1, source={"source": "other"}, progress=False)


def loader(out, **kw):
    args = dict(row_length=256, max_patches=24, batch_size=2, seed=0)
    return ShardLoader(out, **(args | kw))


def test_loader_rows_hold_exactly_the_conversations(corpus):
    """Unshuffled, one epoch of rows unlayouts to every conversation's micro-turns, in order."""
    out, _ = corpus
    m = json.loads((out / "manifest.json").read_text())
    ld = loader(out, shuffle=False, batch_size=1)
    turns = []
    for b in batches(ld, 200):
        row = b.row(0)
        for s in np.unique(row.segment_ids[row.segment_ids > 0]):
            seg = np.flatnonzero(row.segment_ids == s)
            turns.extend(unlayout(row.slice(int(seg[0]), int(seg[-1]) + 1)))
        if len(turns) >= m["micro_turns"]:
            break
    expected = []
    for i in range(N):
        if i % 7 in (1, 2):
            continue
        c = toy_conversation(i)
        c.user_audio, c.model_audio = quantize_pcm16(c.user_audio), quantize_pcm16(c.model_audio)
        expected.extend(to_micro_turns(c))
    assert len(turns) >= len(expected)
    assert all(a.equals(b) for a, b in zip(expected, turns))


def test_loader_is_deterministic_for_a_seed(corpus):
    out, _ = corpus
    assert same_batches(batches(loader(out), 6), batches(loader(out), 6))
    assert not same_batches(batches(loader(out), 6), batches(loader(out, seed=1), 6))


def test_restored_state_gives_exactly_the_same_batches(corpus):
    out, _ = corpus
    ld = loader(out)
    it = iter(ld)
    for _ in range(7):  # crosses an epoch boundary (24 conversations, ~4 rows per shard)
        next(it)
    state = ld.state().to_dict()
    expected = [next(it) for _ in range(8)]
    resumed = loader(out, state=json.loads(json.dumps(state)))
    assert same_batches(batches(resumed, 8), expected)
    assert LoaderState.from_dict(state).epoch >= 0


def test_processes_read_disjoint_shards(corpus):
    out, _ = corpus
    for epoch in range(3):
        parts = [set(loader(out, process_index=p, process_count=2).epoch_shards(epoch)) for p in range(2)]
        assert not parts[0] & parts[1]
        assert len(parts[0] | parts[1]) == 2 * loader(out, process_count=2).shards_per_epoch


@pytest.mark.slow
def test_workers_give_the_same_batches(corpus):
    out, _ = corpus
    assert same_batches(batches(loader(out, workers=2), 5), batches(loader(out), 5))


def test_corrupt_shard_is_a_clear_error(tmp_path):
    build_shards(jobs()[:2], tmp_path, workers=1, source=SOURCE, progress=False)
    p = tmp_path / "train-00001.tar"
    data = bytearray(p.read_bytes())
    data[700] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="train-00001.tar.*sha256"):
        batches(loader(tmp_path, shuffle=False, batch_size=8), 3)


def test_the_loader_aligns_segments_to_the_attention_split_and_refuses_other_alignments(corpus):
    """The loader config's literal default (kept so tml.config imports no JAX) is the
    kernels' split size, the loader's default too; another value fails at construction,
    naming loader.align and the value to use."""
    from tml.config import LoaderConfig
    from tml.kernels import SPLIT_SIZE

    out, _ = corpus
    assert LoaderConfig().align == SPLIT_SIZE == loader(out).align
    with pytest.raises(ValueError, match=r"loader.align=1\b.*set loader.align=64"):
        loader(out, align=1)


def test_an_empty_split_says_it_has_no_conversations(corpus):
    """A corpus built without a held-out split (data.eval_conversations: 0): reading 'eval'
    names the real cause and the fix, not the shard/process count."""
    out, _ = corpus
    with pytest.raises(ValueError, match=r"split 'eval' .* has no conversations.*data.eval_conversations > 0"
                                         r".*train.eval_every=0") as e:
        loader(out, split="eval")
    assert "conversations_per_shard" not in str(e.value)
