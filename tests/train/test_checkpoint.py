"""tml.train.checkpoint: bitwise save/restore, resharding, retention, atomicity, failures,
config guard, preemption."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tests.train.train_toys import TOY_CONFIG, assert_bitwise_equal, bits, make_toy, run_steps
from tml.data_pipelines.loader import LoaderState
from tml.train.checkpoint import (
    CheckpointConfig, CheckpointConfigMismatchError, Checkpointer, CheckpointSaveError,
    CheckpointStructureError, NoCheckpointError, config_fingerprint, install_preemption_handler,
    with_shardings,
)

REPO = Path(__file__).resolve().parents[2]  # workers run as ``python -m tests.train.…`` from here
PY = sys.executable


def _abstract_toy(**sizes):
    """Abstract (shape-only) model and optimizer states, as a restoring trainer builds them."""
    model, opt = nnx.eval_shape(lambda: make_toy(123, **sizes))
    return nnx.state(model), nnx.state(opt)


def _trained(steps=3, seed=0):
    model, opt = make_toy(seed)
    key = run_steps(model, opt, jax.random.key(7), steps)
    return model, opt, key


def _save(ck, step, model, opt, key, **kw):
    ck.save(step, model=nnx.state(model), opt_state=nnx.state(opt), rng=key, **kw)


# --------------------------------------------------------------------------- round trip


def test_save_restore_is_bitwise_and_resumes_identically(tmp_path):
    """Model, optimizer, typed RNG key and loader state come back bit for bit, into a
    target built from nnx.eval_shape; training continued from the restore matches training
    continued from the live objects, bit for bit."""
    model, opt, key = _trained()
    loader_state = LoaderState(epoch=1, shard_pos=2, sample_pos=3, piece_pos=4)
    with Checkpointer(tmp_path / "ck", model_config=TOY_CONFIG) as ck:
        _save(ck, 3, model, opt, key, data_state=loader_state, metrics={"loss": 0.5})
        assert 3 in ck.all_steps(include_pending=True)
        ck.wait_until_finished()
        assert ck.latest_step() == 3

    abstract_model, abstract_opt = _abstract_toy()
    with Checkpointer(tmp_path / "ck", model_config=TOY_CONFIG) as ck2:
        r = ck2.restore(model=abstract_model, opt_state=abstract_opt, rng=jax.random.key(0))
    assert r.step == 3 and r.metrics == {"loss": 0.5}
    assert LoaderState.from_dict(r.data_state) == loader_state
    assert_bitwise_equal(r.model, nnx.state(model))
    assert_bitwise_equal(r.opt_state, nnx.state(opt))
    assert jax.dtypes.issubdtype(r.rng.dtype, jax.dtypes.prng_key)
    assert_bitwise_equal(r.rng, key)

    model2, opt2 = make_toy(99)  # different init, overwritten by the restore
    nnx.update(model2, r.model)
    nnx.update(opt2, r.opt_state)
    run_steps(model, opt, key, 3)
    run_steps(model2, opt2, r.rng, 3)
    assert_bitwise_equal(nnx.state(model2), nnx.state(model))
    assert_bitwise_equal(nnx.state(opt2), nnx.state(opt))


def test_layout_is_container_independent(tmp_path):
    """A checkpoint written from nnx.State restores into a plain nested-dict target."""
    model, opt, key = _trained(1)
    with Checkpointer(tmp_path, model_config=TOY_CONFIG) as ck:
        _save(ck, 1, model, opt, key, wait=True)
        pure = nnx.state(model).to_pure_dict()
        r = ck.restore(model=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pure))
    assert isinstance(r.model, dict) and r.opt_state is None and r.rng is None
    assert_bitwise_equal(r.model, pure)


def test_restore_onto_sharded_target_in_process(tmp_path):
    """Restore onto NamedShardings over this process's devices (one CPU device here; the
    multi-device case runs in test_restore_onto_a_different_mesh)."""
    model, opt, key = _trained(1)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    with Checkpointer(tmp_path, model_config=TOY_CONFIG) as ck:
        _save(ck, 1, model, opt, key, wait=True)
        abstract_model, _ = _abstract_toy()
        target = with_shardings(abstract_model, lambda path, x: NamedSharding(
            mesh, P("data") if x.ndim == 2 else P()))
        r = ck.restore(model=target)
    for leaf, t in zip(jax.tree.leaves(r.model), jax.tree.leaves(target)):
        assert leaf.sharding == t.sharding
    assert_bitwise_equal(r.model, nnx.state(model))


_RESHARD_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tml.train.checkpoint import Checkpointer
assert jax.device_count() == 4, jax.devices()
d = np.array(jax.devices())
x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 7.0
y = np.arange(4 * 8, dtype=np.float32).reshape(4, 8) * np.float32(1e-3)
m4 = Mesh(d, ("data",))
tree = {"w": jax.device_put(x, NamedSharding(m4, P("data", None))),
        "v": jax.device_put(y, NamedSharding(m4, P(None, "data")))}
with Checkpointer(sys.argv[1], model_config={"d": 1}) as ck:
    ck.save(1, model=tree, wait=True)
    m22 = Mesh(d.reshape(2, 2), ("a", "b"))
    targets = {
        "mesh_2x2": {"w": NamedSharding(m22, P("b", "a")), "v": NamedSharding(m22, P("a", None))},
        "one_device": {"w": jax.sharding.SingleDeviceSharding(d[3]), "v": jax.sharding.SingleDeviceSharding(d[3])},
    }
    out = {}
    for name, sh in targets.items():
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in tree.items()}
        r = ck.restore(model=abstract).model
        out[name] = {
            "bitwise": all(np.array_equal(np.asarray(r[k]).view(np.uint32), np.asarray(tree[k]).view(np.uint32)) for k in tree),
            "shardings_match": all(r[k].sharding == sh[k] for k in tree),
            "n_shards_w": len(r["w"].addressable_shards),
        }
print("RESULT " + json.dumps(out))
"""


def test_restore_onto_a_different_mesh(tmp_path):
    """Saved sharded over a 4-device mesh, restored onto a 2x2 mesh with other partition
    specs and onto a single device (4 fake CPU devices in a subprocess): raw bits equal and
    every array lands on the requested sharding."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([PY, "-c", _RESHARD_SCRIPT, str(tmp_path / "ck")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert out["mesh_2x2"] == {"bitwise": True, "shardings_match": True, "n_shards_w": 4}
    assert out["one_device"] == {"bitwise": True, "shardings_match": True, "n_shards_w": 1}


def test_async_save_is_a_snapshot(tmp_path):
    """Donating/overwriting the saved arrays right after an async save() returns does not
    change what lands on disk."""
    tree = {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) / 3}
    expected = np.asarray(tree["w"]).copy()
    bump = jax.jit(lambda t: jax.tree.map(lambda x: x * 2 + 1, t), donate_argnums=0)
    with Checkpointer(tmp_path, model_config={}) as ck:
        ck.save(1, model=tree)
        tree = bump(tree)
        tree = bump(tree)
        ck.wait_until_finished()
        r = ck.restore(model={"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)})
    assert np.array_equal(np.asarray(r.model["w"]).view(np.uint32), expected.view(np.uint32))


# --------------------------------------------------------------------------- retention


def _state(i):
    return {"w": jnp.full((4,), i, jnp.float32)}


def test_keep_last_deletes_old_checkpoints(tmp_path):
    with Checkpointer(tmp_path, keep_last=2) as ck:
        for step in range(1, 6):
            ck.save(step, model=_state(step))
        ck.wait_until_finished()
        assert ck.all_steps() == [4, 5]
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 5]
    assert not list(tmp_path.glob("*tmp*"))


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_keeps_the_best(tmp_path, mode):
    """keep_last=1 + keep_best=1: the newest and the best by eval_loss survive; a NaN
    metric is never 'best'; restore(best=True) picks the best; the policy survives a
    restart (metrics are read back from disk)."""
    losses = {1: 5.0, 2: 1.0, 3: 9.0, 4: None, 5: 3.0, 6: float("nan"), 7: 6.0}
    best = 2 if mode == "min" else 3
    with Checkpointer(tmp_path, keep_last=1, keep_best=1, best_mode=mode) as ck:
        for step, loss in losses.items():  # step 4: saved without the metric, latest-only
            ck.save(step, model=_state(step), metrics=None if loss is None else {"eval_loss": loss})
        ck.wait_until_finished()
        assert ck.best_step() == best
        assert set(ck.all_steps()) == {best, 7}
        r = ck.restore(model={"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, best=True)
        assert r.step == best and float(r.model["w"][0]) == best
    with Checkpointer(tmp_path, keep_last=1, keep_best=1, best_mode=mode) as ck:
        ck.save(8, model=_state(8), metrics={"eval_loss": 100.0 if mode == "min" else -1.0})
        ck.wait_until_finished()
        assert set(ck.all_steps()) == {best, 8}


# --------------------------------------------------------------------------- atomicity and failures


def test_orbax_writes_to_tmp_then_renames(tmp_path, monkeypatch):
    """At commit time the step only exists as <step>.orbax-checkpoint-tmp (every file
    already written); the final name appears only through the rename."""
    from orbax.checkpoint._src.path import atomicity

    seen = {}
    original = atomicity.on_commit_callback

    async def spy(tmp_dir, **kw):
        names = sorted(p.name for p in tmp_path.iterdir())
        seen["before"] = names
        tmp = tmp_path / "2.orbax-checkpoint-tmp"
        seen["tmp_items"] = sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
        await original(tmp_dir, **kw)
        seen["after"] = sorted(p.name for p in tmp_path.iterdir())

    with Checkpointer(tmp_path, keep_last=5) as ck:
        ck.save(1, model=_state(1), wait=True)
        monkeypatch.setattr(atomicity, "on_commit_callback", spy)
        ck.save(2, model=_state(2), data_state={"epoch": 0}, wait=True)
    assert "2" not in seen["before"] and "2.orbax-checkpoint-tmp" in seen["before"]
    assert {"model", "data", "meta"} <= set(seen["tmp_items"])
    assert "2" in seen["after"] and not any("tmp" in n for n in seen["after"])


@pytest.mark.parametrize("async_save", [True, False])
def test_failed_save_keeps_last_good_checkpoint(tmp_path, monkeypatch, async_save):
    """A failure at commit time (here: ENOSPC raised where the tmp dir would be renamed)
    with keep_last=1 — so a careless implementation would already have deleted step 1 —
    raises a clear CheckpointSaveError; step 1 stays restorable bit for bit; the same
    Checkpointer saves again once the disk is back; a new Checkpointer removes the
    half-written tmp dir."""
    from orbax.checkpoint._src.path import atomicity

    async def disk_full(tmp_dir, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with Checkpointer(tmp_path, keep_last=1, async_save=async_save) as ck:
        ck.save(1, model=_state(1), data_state={"epoch": 1}, wait=True)
        monkeypatch.setattr(atomicity, "on_commit_callback", disk_full)
        with pytest.raises(CheckpointSaveError) as err:
            ck.save(2, model=_state(2), wait=True)
        monkeypatch.undo()
        msg = str(err.value)
        assert "step 2" in msg and "No space left" in msg and "step 1" in msg and "untouched" in msg
        assert ck.latest_step() == 1 and (tmp_path / "1").is_dir()
        r = ck.restore(model=target)
        assert r.step == 1 and r.data_state == {"epoch": 1}
        assert_bitwise_equal(r.model, _state(1))
        ck.save(3, model=_state(3), wait=True)  # the same Checkpointer keeps working
        assert ck.all_steps() == [3]
    assert (tmp_path / "2.orbax-checkpoint-tmp").exists()
    with Checkpointer(tmp_path, keep_last=1, async_save=async_save) as ck:
        assert ck.all_steps() == [3]
        ck.save(4, model=_state(4), wait=True)
        assert ck.all_steps() == [4] and not list(tmp_path.glob("*tmp*"))
        assert_bitwise_equal(ck.restore(model=target).model, _state(4))


_DISK_FULL_SCRIPT = r"""
import resource, signal, sys
import jax.numpy as jnp, numpy as np
from tml.train.checkpoint import Checkpointer, CheckpointSaveError
d = sys.argv[1]
good = {"w": jnp.arange(4096, dtype=jnp.float32)}
ck = Checkpointer(d, keep_last=1)
ck.save(1, model=good, data_state={"epoch": 1}, wait=True)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))  # every file > 64 bytes: "disk full"
try:
    ck.save(2, model={"w": good["w"] + 1}, data_state={"epoch": 2}, wait=True)
    print("NO ERROR")
except CheckpointSaveError as e:
    print("SAVE ERROR: " + str(e).replace("\n", " "))
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
ck2 = Checkpointer(d, keep_last=1)  # as a restarted job would
r = ck2.restore(model={"w": jnp.zeros(4096, jnp.float32)})
same = np.array_equal(np.asarray(r.model["w"]).view(np.uint32), np.asarray(good["w"]).view(np.uint32))
print(f"LATEST {ck2.latest_step()} SAME {same} DATA {r.data_state}")
ck.save(3, model={"w": good["w"] + 3}, wait=True)  # disk back: the same Checkpointer saves
print(f"AFTER {ck.all_steps()}")
ck.close(); ck2.close()
"""


def test_real_write_failure_mid_save_keeps_last_good(tmp_path):
    """A real I/O failure while the arrays are written (file-size limit of 64 bytes: the
    writer gets EFBIG, as on a full disk), in a subprocess: clear error, step 1 intact and
    restorable by a restarted job, and the same Checkpointer saves again once writes work."""
    p = subprocess.run([PY, "-c", _DISK_FULL_SCRIPT, str(tmp_path / "ck")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "SAVE ERROR: saving checkpoint step 2" in p.stdout, p.stdout + p.stderr[-2000:]
    assert "last good checkpoint, step 1" in p.stdout
    assert "AFTER [3]" in p.stdout
    assert "LATEST 1 SAME True DATA {'epoch': 1}" in p.stdout


def test_existing_step_and_missing_checkpoint_errors(tmp_path):
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(NoCheckpointError, match="no checkpoint in"):
            ck.restore(model=_state(0))
        ck.save(1, model=_state(1), wait=True)
        with pytest.raises(CheckpointSaveError, match="already exists"):
            ck.save(1, model=_state(1))
        with pytest.raises(NoCheckpointError, match=r"available: \[1\]"):
            ck.restore(5, model=_state(0))


# --------------------------------------------------------------------------- config guard


def test_checkpoint_from_another_model_config_is_refused(tmp_path):
    model, opt, key = _trained(1)
    with Checkpointer(tmp_path, model_config=TOY_CONFIG) as ck:
        _save(ck, 1, model, opt, key, wait=True)
    other = {**TOY_CONFIG, "d_hidden": 32}
    abstract_model, _ = _abstract_toy(d_hidden=32)
    with Checkpointer(tmp_path, model_config=other) as ck:
        with pytest.raises(CheckpointConfigMismatchError) as err:
            ck.restore(model=abstract_model)
        msg = str(err.value)
        assert "d_hidden: checkpoint 16, current 32" in msg
        assert "model.d_hidden=16" in msg and "new checkpoint directory" in msg
        assert "d_in" not in msg  # only differing keys are listed
        with pytest.raises(CheckpointConfigMismatchError, match="refusing to save"):
            ck.save(2, model=nnx.state(model))
        # the escape hatch still checks the arrays themselves
        with pytest.raises(CheckpointStructureError, match=r"l1/kernel \(4, 16\) vs \(4, 32\)"):
            ck.restore(model=abstract_model, allow_config_mismatch=True)
    assert config_fingerprint(TOY_CONFIG) == config_fingerprint(dict(reversed(TOY_CONFIG.items())))
    assert config_fingerprint(TOY_CONFIG) != config_fingerprint(other)


def test_scanned_or_rematerialised_layers_restore_the_same_checkpoint(tmp_path):
    """model.scan_layers / model.remat change how rows are computed, not the parameters: a
    checkpoint written without them (or before they existed) restores with them."""
    import dataclasses

    from tml.model.config import ModelConfig

    plain = dataclasses.asdict(ModelConfig())
    before = {k: v for k, v in plain.items() if k not in ("scan_layers", "remat")}  # an older checkpoint's
    model, opt, key = _trained(1)
    with Checkpointer(tmp_path, model_config=before) as ck:
        _save(ck, 1, model, opt, key, wait=True)
    abstract_model, _ = _abstract_toy()
    with Checkpointer(tmp_path, model_config=ModelConfig(scan_layers=True, remat=True)) as ck:
        assert ck.restore(model=abstract_model) is not None
    with Checkpointer(tmp_path, model_config={**plain, "d_model": 256}) as ck:
        with pytest.raises(CheckpointConfigMismatchError, match="d_model"):
            ck.restore(model=abstract_model)


def test_structure_mismatch_names_the_arrays(tmp_path):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, model={"a": jnp.zeros(3), "b": jnp.zeros(2)}, wait=True)
        with pytest.raises(CheckpointStructureError, match=r"not the checkpoint: \['c'\].*not the target: \['b'\]"):
            ck.restore(model={"a": jnp.zeros(3), "c": jnp.zeros(2)})


def test_from_config_places_dir_under_run_dir(tmp_path):
    cfg = CheckpointConfig(dir="ckpt", keep_last=2, keep_best=0, async_save=False)
    with Checkpointer.from_config(cfg, run_dir=tmp_path, model_config=TOY_CONFIG) as ck:
        ck.save(1, model=_state(1))
        assert (tmp_path / "ckpt" / "1").is_dir()  # synchronous: committed on return


# --------------------------------------------------------------------------- preemption


def test_immediate_preemption_handler_saves_and_exits(tmp_path):
    """immediate=True: the callback runs inside the signal handler, then SystemExit."""
    calls = []
    previous = signal.getsignal(signal.SIGUSR1)
    h = install_preemption_handler(lambda: calls.append("saved"), signals=(signal.SIGUSR1,),
                                   immediate=True, exit_code=3)
    try:
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)  # the handler runs at the next bytecode boundary
        assert e.value.code == 3 and calls == ["saved"]
    finally:
        h.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_sigterm_in_a_training_subprocess_saves_a_final_checkpoint(tmp_path):
    """A toy training loop (tests/train/sigterm_worker.py) gets SIGTERM mid-run: it saves
    a final checkpoint at the next step boundary and exits 0; that checkpoint restores bit
    for bit to the state the worker dumped at its final save, including the loader state."""
    ckdir, dump = tmp_path / "ck", tmp_path / "final.npz"
    proc = subprocess.Popen([PY, "-m", "tests.train.sigterm_worker", str(ckdir), str(dump)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        line = ""
        while "READY" not in line:  # first periodic checkpoint committed
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "worker never became ready"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    final_step = int(out.split("FINAL_STEP ")[1].split()[0])
    with Checkpointer(ckdir, model_config=TOY_CONFIG) as ck:
        assert ck.latest_step() == final_step and final_step >= 10  # 10 when the signal lands on that step
        abstract_model, abstract_opt = _abstract_toy()
        r = ck.restore(model=abstract_model, opt_state=abstract_opt, rng=jax.random.key(0))
    saved = np.load(dump)
    got = bits(r.model) + bits(r.opt_state) + bits(r.rng)
    assert len(got) == len(saved.files)
    for i, g in enumerate(got):
        assert np.array_equal(g, saved[f"a{i}"])
    assert r.data_state == {"epoch": 0, "shard_pos": 0, "sample_pos": final_step, "piece_pos": 0}


def _tree(d: Path) -> dict:
    """Every path under ``d`` → (size, mtime_ns), directories included."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def test_read_only_reader_leaves_an_unfinished_save_alone(tmp_path, monkeypatch):
    """A trainer's save of step 2 not yet committed (Orbax's own ``2.orbax-checkpoint-tmp``,
    every item written, the rename not done: here the commit is made to fail) while a reader
    opens the directory: the read-only Checkpointer lists and restores step 1 bit for bit,
    refuses to save, and leaves every file as it was, the tmp save included; a writable
    Checkpointer opened the same way (what every reader did before) deletes the tmp save
    within a second — the hazard read-only opening exists for."""
    from orbax.checkpoint._src.path import atomicity

    async def not_yet(tmp_dir, **kw):
        raise OSError(errno.EIO, "commit held back by the test")

    with Checkpointer(tmp_path, keep_last=5, async_save=False) as ck:
        ck.save(1, model=_state(1), wait=True)
        monkeypatch.setattr(atomicity, "on_commit_callback", not_yet)
        with pytest.raises(CheckpointSaveError):
            ck.save(2, model=_state(2), wait=True)
        monkeypatch.undo()
    tmp = tmp_path / "2.orbax-checkpoint-tmp"
    assert (tmp / "model").is_dir() and (tmp / "_CHECKPOINT_METADATA").exists()
    before = _tree(tmp_path)
    with Checkpointer.open_read_only(tmp_path) as reader:
        assert reader.all_steps() == [1] and reader.latest_step() == 1
        r = reader.restore(model={"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
        assert_bitwise_equal(r.model, _state(1))
        with pytest.raises(CheckpointSaveError, match="read-only"):
            reader.save(3, model=_state(3))
        time.sleep(1.0)                     # a writable opening's background cleanup is done by now
    assert _tree(tmp_path) == before
    with pytest.raises(NoCheckpointError, match="no checkpoint directory"):
        Checkpointer.open_read_only(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()
    with Checkpointer(tmp_path, keep_last=5):
        for _ in range(40):
            if not tmp.exists():
                break
            time.sleep(0.05)
        assert not tmp.exists()
