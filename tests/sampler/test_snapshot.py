"""The engine restarted from a checkpoint between ticks: a snapshot restored into a new
engine (fresh pool) continues bit for bit like an engine that never stopped, and
``score`` still matches (raw bits); bad snapshots are clear errors.

Standard companion: the restore itself copies the KV pages, so it is exact in both modes
(asserted); what ``standard`` breaks is the alignment with ``score`` (same shapes as
tests/sampler/test_alignment.py: paged dense softmax over 4 pages vs the row's), and a
batch_invariant run compared with a standard one differs, so the comparison can fail.
"""

import json
import zipfile

import numpy as np
import pytest
from flax import nnx

from tests.model.tiny_model import CFG, tiny_model
from tests.sampler.scenario import ENGINE, inputs_for, sampler_vs_score
from tml import kernels
from tml.model.model import InteractionModel
from tml.sampler import Engine, SamplingParams, score
from tml.sampler.snapshot import MANIFEST, SnapshotError

KW = {**ENGINE, "max_prefill_chunk": 8, "chunk_buckets": (8,)}
BEFORE, AFTER = 4, 3          # ticks before the snapshot, ticks after it
SEEDS = (11, 12, 13)


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def same(a, b) -> bool:
    return a.shape == b.shape and np.array_equal(bits(a), bits(b))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _open(eng):
    return [eng.open(seed=SEEDS[0], context="hi"), eng.open(seed=SEEDS[1], sampling=SamplingParams(temperature=0.0)),
            eng.open(seed=SEEDS[2])]


def _feeds():
    return [inputs_for(400 + s, BEFORE + AFTER + 2) for s in SEEDS]


def _ticks(eng, sids, feeds, ts):
    for t in ts:
        for sid, f in zip(sids, feeds):
            eng.append(sid, f[t])
        eng.tick()


def _run(model, mode, tmp_path):
    """Engine A: BEFORE ticks (a rollback among them), snapshot, AFTER more ticks, then a
    rollback to before the snapshot and one re-appended tick. Engine B: a new engine
    restored from the snapshot, the same AFTER ticks, rollback and re-append."""
    feeds = _feeds()
    with kernels.kernel_mode(mode):
        a = Engine(model, **KW)
        sids = _open(a)
        _ticks(a, sids, feeds, range(BEFORE - 1))
        a.rollback(sids[2], 1)                                   # starts/tails cut before the save
        for sid, f in zip(sids, feeds):
            a.append(sid, f[BEFORE - 1] if sid != sids[2] else f[1])
        a.tick()
        a.snapshot(tmp_path)
        at_snapshot = {sid: len(a.turns(sid)) for sid in sids}
        history = a.turns(sids[1])
        _ticks(a, sids, feeds, range(BEFORE, BEFORE + AFTER))
        a_out = {sid: a.outputs(sid) for sid in sids}
        a_turns = {sid: a.turns(sid) for sid in sids}
        a.rollback(sids[0], 2)
        a_redo = a.step(sids[0], feeds[0][5])

        b = Engine(model, **KW)
        assert b.restore(tmp_path) == sids
        b.pool.check()
        _ticks(b, sids, feeds, range(BEFORE, BEFORE + AFTER))
        b_out = {sid: b.outputs(sid) for sid in sids}
        b_turns = {sid: b.turns(sid) for sid in sids}
        scored = score(model, [b_turns[sid] for sid in sids])
        b.rollback(sids[0], 2)
        b_redo = b.step(sids[0], feeds[0][5])
        b.pool.check()
        # the greedy session re-prefilled from its history (no snapshot) in a new engine
        c = Engine(model, **KW)
        cid = c.open(seed=SEEDS[1], sampling=SamplingParams(temperature=0.0))
        c.load_history(cid, history)
        c_out = [c.step(cid, feeds[1][t]) for t in range(BEFORE, BEFORE + AFTER)]
    return dict(sids=sids, at=at_snapshot, a_out=a_out, b_out=b_out, a_turns=a_turns, b_turns=b_turns, scored=scored,
                a_redo=a_redo, b_redo=b_redo, c_out=c_out)


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    return {mode: _run(model, mode, tmp_path_factory.mktemp(mode)) for mode in ("batch_invariant", "standard")}


def _flat(outs):
    return np.concatenate([o.logprobs for o in outs]), np.concatenate([o.tokens for o in outs])


@pytest.mark.parametrize("mode", ["batch_invariant", "standard"])
def test_restored_engine_continues_bit_for_bit(runs, mode):
    """The restore copies KV pages, so it is exact in either mode."""
    r = runs[mode]
    for sid in r["sids"]:
        n = r["at"][sid]
        (la, ta), (lb, tb) = _flat(r["a_out"][sid][n:]), _flat(r["b_out"][sid][n:])
        assert len(r["b_out"][sid]) == n + AFTER
        assert np.array_equal(ta, tb) and same(la, lb)
        assert all(x.equals(y) for x, y in zip(r["a_turns"][sid], r["b_turns"][sid]))
        # speech channels and frames restored too (the history before the snapshot)
        for x, y in zip(r["a_out"][sid], r["b_out"][sid]):
            assert same(x.speech_channel_logprobs, y.speech_channel_logprobs)
            assert np.array_equal(x.speech, y.speech) and x.text_bytes == y.text_bytes
    # rollback to before the snapshot (restored starts and tails) and re-append: identical
    assert np.array_equal(r["a_redo"].tokens, r["b_redo"].tokens) and same(r["a_redo"].logprobs, r["b_redo"].logprobs)


@pytest.mark.parametrize("mode,equal", [("batch_invariant", True), ("standard", False)])
def test_restored_sessions_score_like_the_trainer(runs, mode, equal):
    r = runs[mode]
    ok = [same(*sampler_vs_score(r["b_out"][sid], sc)) for sid, sc in zip(r["sids"], r["scored"])]
    assert all(ok) == equal


def test_the_comparison_can_fail_across_modes(runs):
    """batch_invariant restored continuation vs the standard engine that never stopped."""
    bi, st = runs["batch_invariant"], runs["standard"]
    diffs = [not same(_flat(bi["b_out"][sid][n:])[0], _flat(st["a_out"][sid][n:])[0]) for sid, n in bi["at"].items()]
    assert any(diffs)


@pytest.mark.parametrize("mode,equal", [("batch_invariant", True), ("standard", False)])
def test_load_history_equals_living_it(runs, mode, equal):
    """Re-prefilling a history (chunks of 8 from slot 0) instead of restoring its pages:
    exact only in batch_invariant (standard: other chunk boundaries, other KV bits)."""
    r = runs[mode]
    sid = r["sids"][1]
    lived = _flat(r["a_out"][sid][r["at"][sid]:])[0]
    assert same(lived, _flat(r["c_out"])[0]) == equal


# ---------------------------------------------------------------- bad snapshots
@pytest.fixture()
def saved(model, tmp_path):
    with kernels.kernel_mode("batch_invariant"):
        eng = Engine(model, **KW)
        sid = eng.open(seed=1)
        eng.step(sid, inputs_for(1, 1)[0])
        eng.snapshot(tmp_path)
    return eng, tmp_path


def test_no_snapshot(model, tmp_path):
    with pytest.raises(SnapshotError, match="no engine snapshot"):
        Engine(model, **KW).restore(tmp_path)


def test_corrupt_npz(model, saved):
    _, d = saved
    npz = next(d.glob("sessions-*.npz"))
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="corrupt"):
        Engine(model, **KW).restore(d)


def test_corrupt_manifest(model, saved):
    _, d = saved
    (d / MANIFEST).write_text((d / MANIFEST).read_text()[:-40])
    with pytest.raises(SnapshotError, match="corrupt"):
        Engine(model, **KW).restore(d)


def test_inconsistent_npz(model, saved):
    """A npz whose hash matches the manifest but lacks what it describes."""
    _, d = saved
    npz = next(d.glob("sessions-*.npz"))
    with zipfile.ZipFile(npz, "w") as z:
        z.writestr("nothing.npy", b"")
    import hashlib
    m = json.loads((d / MANIFEST).read_text())
    m["npz_sha256"] = hashlib.sha256(npz.read_bytes()).hexdigest()
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(SnapshotError, match="does not hold"):
        Engine(model, **KW).restore(d)


def test_other_model_config(saved):
    _, d = saved
    other = InteractionModel(CFG.__class__(**{**CFG.__dict__, "n_experts": 0}), rngs=nnx.Rngs(0))
    with pytest.raises(SnapshotError, match="model.n_experts"):
        Engine(other, **KW).restore(d)


def test_other_weights(saved):
    _, d = saved
    with pytest.raises(SnapshotError, match="other weights"):
        Engine(InteractionModel(CFG, rngs=nnx.Rngs(1)), **KW).restore(d)


def test_other_page_size(model, saved):
    _, d = saved
    with pytest.raises(SnapshotError, match="page_size"):
        Engine(model, **{**KW, "page_size": 128}).restore(d)


def test_pending_and_busy_engine(model, saved):
    eng, d = saved
    sid = eng.open(seed=2)
    eng.append(sid, inputs_for(2, 1)[0])
    with pytest.raises(SnapshotError, match="tick"):
        eng.snapshot(d)
    with pytest.raises(SnapshotError, match="serves no sessions"):
        eng.restore(d)
    # the failed save left the old snapshot intact and readable
    fresh = Engine(eng.graphdef and model, **KW)
    assert fresh.restore(d) == [0]
    fresh.pool.check()
