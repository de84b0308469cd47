"""``tml rl`` with the engine on another mesh than the learner, and as two processes of one
``jax.distributed`` program (tml.rl.distributed).

The end-to-end runs are subprocesses (tests/rl/distributed_check.py: fake CPU devices need
XLA_FLAGS before JAX starts): one RL step on the tiny TP model, each push checked
(``engine/push_bitwise``: sha256 of the engine's weights == the learner's). Measured on the
shared 2-core CPU: ~2 min of CPU, 8 min wall, per run (compiles), hence ``slow``.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from tml.sampler.divergence import ALIGNED, METRICS

HELPER = "tests.rl.distributed_check"  # run as ``python -m`` from the repository root
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(out, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "SLURM_", "TML_"))}
    os.makedirs(out, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", HELPER, *args[:1], str(out), *args[1:]], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(procs: dict) -> dict:
    out = {}
    try:
        for key, (p, path) in procs.items():
            _, err = p.communicate(timeout=1500)
            assert p.returncode == 0, err[-4000:]
            with open(path) as f:
                out[key] = json.load(f)
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Both kernel modes, engine TP 2 on devices 1-2, learner on device 0 (run side by side)."""
    procs = {}
    for mode in ("batch_invariant", "standard"):
        out = tmp_path_factory.mktemp(mode)
        procs[mode] = (_launch(out, mode), out / "result_0.json")
    return _results(procs)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    from tests.train.test_distributed import _free_port

    out = tmp_path_factory.mktemp("two")
    coord = f"127.0.0.1:{_free_port()}"
    return _results({pid: (_launch(out, "batch_invariant", coord, str(pid)), out / f"result_{pid}.json")
                     for pid in (0, 1)})


@pytest.mark.slow
def test_engine_on_a_tp_mesh_of_its_own_stays_bitwise(one_process):
    r = one_process["batch_invariant"]
    assert r["device_count"] == 8 and r["learner_device"] == 0 and r["engine_devices"] == [1, 2]
    (rec,) = r["records"]
    assert {k: rec[k] for k in METRICS} == ALIGNED and rec["tokens"] > 0
    assert rec["engine/push_bitwise"] == 1.0
    assert rec["engine/compiled_programs_after_push"] == rec["engine/compiled_programs"]


@pytest.mark.slow
def test_engine_on_a_tp_mesh_standard_shows_the_drift(one_process):
    (rec,) = one_process["standard"]["records"]
    assert rec["mismatch/bitwise_equal_fraction"] < 1.0 and rec["mismatch/logprob_abs_diff_max"] > 0
    assert rec["engine/push_bitwise"] == 1.0  # the push is exact in either mode: only the kernels drift


@pytest.mark.slow
def test_two_processes_learner_and_engine(two_processes):
    learner, engine = two_processes[0], two_processes[1]
    assert learner["role"] == "learner" and engine["role"] == "engine"
    assert learner["device_count"] >= 4 and learner["learner_device"] == 0  # fake devices on each process
    assert engine["engine_devices"] == learner["engine_devices"] and 0 not in engine["engine_devices"]
    assert engine["records"] == []  # the learner logs
    (rec,) = learner["records"]
    assert {k: rec[k] for k in METRICS} == ALIGNED and rec["tokens"] > 0
    assert rec["engine/push_bitwise"] == 1.0  # the engine process's weights are the learner's bits


def test_push_weights_moves_raw_bits():
    """One process: the all-gather transport gives back every leaf's bits (-0.0, NaN payloads,
    bfloat16, ints) and the tree structure."""
    from tml.rl.distributed import push_weights, send

    x = np.array([-0.0, 1.5, np.nan], np.float32)
    x.view(np.uint32)[2] = 0x7FC00123  # a NaN with a payload
    tree = {"a": jnp.asarray(x), "b": jnp.asarray([1.0, -0.0], jnp.bfloat16), "c": (jnp.arange(3, dtype=jnp.int32),)}
    got = push_weights(tree, 0)
    assert set(got) == {"a", "b", "c"} and isinstance(got["c"], tuple)
    for a, b in zip(jax_leaves(tree), jax_leaves(got)):
        a = np.asarray(a)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}"))
    assert send({"k": [1, 2]}, 0) == {"k": [1, 2]}


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_placement_errors_say_what_to_do():
    import dataclasses

    import jax

    from tml.rl.config import EngineMeshConfig, RLConfig
    from tml.rl.distributed import place

    with pytest.raises(ValueError, match="rl.engine_mesh.tensor must be >= 1"):
        place(dataclasses.replace(RLConfig(), engine_mesh=EngineMeshConfig(tensor=0)))
    with pytest.raises(ValueError, match="rl.engine_mesh.algorithm='x'"):
        place(dataclasses.replace(RLConfig(), engine_mesh=EngineMeshConfig(algorithm="x")))
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"needs 1 \\+ {n + 1} devices.*device_count={n + 2}"):
        place(dataclasses.replace(RLConfig(), engine_mesh=EngineMeshConfig(tensor=n + 1)))
    p = place(RLConfig())
    assert p.role == "both" and p.engine is None and p.learner_device == jax.devices()[0]
