"""The trainer on a mesh: the gradient-sum tree, data-parallel degrees 1, 2 and 4 on 8
fake CPU devices (bitwise with ``batch_invariant``, not with ``standard``), a resume onto
another mesh, an fsdp x tensor mesh, and two local processes on 127.0.0.1 training
together, bitwise equal to one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.trainer_fixtures import build_corpus
from tml.kernels import kernel_mode, sequence_tree
from tml.train.metrics_log import read_metrics
from tml.train.step import tree_accumulate

REPO = Path(__file__).resolve().parents[2]  # the worker runs as ``python -m tests.train.…`` from here
WORKER = [sys.executable, "-m", "tests.train.train_worker"]


def bits(x):
    return np.asarray(x).view(np.uint32)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 12])
def test_tree_accumulate_is_the_sequence_tree(n):
    """The scan's binary counter sums in exactly the adjacent-pairs tree; left to right
    (standard) differs for the wide-range values used here once n >= 4."""
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.standard_normal((n, 4096)) * 10.0 ** rng.uniform(-4, 4, (n, 4096)), jnp.float32)
    tree, aux = jax.jit(lambda xs: tree_accumulate(lambda v: (v, v[0]), xs))(x)
    assert np.array_equal(bits(tree), bits(sequence_tree([x[i] for i in range(n)])))
    assert aux.shape == (n,)
    with kernel_mode("standard"):
        seq, _ = jax.jit(lambda xs: tree_accumulate(lambda v: (v, v[0]), xs))(x)
    left = x[0]
    for i in range(1, n):
        left = left + x[i]
    assert np.array_equal(bits(seq), bits(left))
    if n >= 4:
        assert not np.array_equal(bits(seq), bits(tree))


def test_blocks_of_a_power_of_two_compose_into_the_global_tree():
    """What the data-parallel reduction relies on: tree over d block sums of 2^a parts ==
    tree over all parts."""
    rng = np.random.default_rng(0)
    parts = [jnp.asarray(rng.standard_normal(512) * 10.0 ** rng.uniform(-4, 4, 512), jnp.float32)
             for _ in range(8)]
    whole = sequence_tree(parts)
    for block in (1, 2, 4, 8):
        sums = [sequence_tree(parts[i:i + block]) for i in range(0, 8, block)]
        assert np.array_equal(bits(sequence_tree(sums)), bits(whole))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TML_", "XLA_FLAGS"))}
    return env | {"JAX_PLATFORMS": "cpu"} | extra


def _spec(tmp_path, corpus, runs, name="spec.json") -> Path:
    for r in runs:
        r["run_dir"] = str(tmp_path / r["run_dir"])
    spec = tmp_path / name
    spec.write_text(json.dumps({"corpus": corpus.out_dir, "cache": str(tmp_path / "jax-cache"), "runs": runs}))
    return spec


def _run(spec: Path, env: dict, timeout: int = 900) -> list[dict]:
    p = subprocess.run([*WORKER, str(spec)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=timeout, check=False)
    assert p.returncode == 0, p.stderr[-6000:]
    return [json.loads(line.split("RESULT ", 1)[1]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]


def _leaves(run_dir) -> list[np.ndarray]:
    with np.load(Path(run_dir) / "final.npz") as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _same_bits(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x.view(np.uint32), y.view(np.uint32)) for x, y in zip(a, b))


STEPS = 2
EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@pytest.mark.slow
def test_data_parallel_degrees_1_2_4_are_bitwise_identical(corpus, tmp_path):
    """4 canonical micro-batches of 1 row; DP=1, 2, 4 on 8 fake devices, 2 steps; plus
    1 step on DP=2, resumed on DP=4 for the second; plus a (data 2, fsdp 2, tensor 2) mesh."""
    runs = [{"run_dir": f"dp{d}", "steps": STEPS, "devices": d} for d in (1, 2, 4)]
    runs += [{"run_dir": "moved", "steps": 1, "devices": 2}, {"run_dir": "moved", "steps": STEPS, "devices": 4}]
    runs += [{"run_dir": "mixed", "steps": STEPS, "mesh": {"data": 2, "fsdp": 2, "tensor": 2}}]
    out = _run(_spec(tmp_path, corpus, runs), _env(**EIGHT))
    assert [o["mesh"]["data"] for o in out] == [1, 2, 4, 2, 4, 2]
    ref = _leaves(out[0]["run_dir"])
    for o in out[1:5]:
        assert _same_bits(_leaves(o["run_dir"]), ref), o["run_dir"]
    # (data 2, fsdp 2, tensor 2) under GSPMD: the same first-step loss and gradient norm
    # to float32 rounding; parameters close (2 Adam steps of lr 3e-3 could move them 1.2e-2)
    first = [read_metrics(out[i]["run_dir"])[0] for i in (0, 5)]
    for key in ("loss", "loss_text", "loss_speech", "loss_control", "grad_norm"):
        assert np.isclose(first[0][key], first[1][key], rtol=1e-5), key
    mixed = _leaves(out[5]["run_dir"])
    assert max(float(np.abs(a - b).max()) for a, b in zip(mixed, ref)) <= 1e-3


@pytest.mark.slow
def test_standard_kernels_are_not_data_parallel_invariant(corpus, tmp_path):
    runs = [{"run_dir": f"dp{d}", "steps": STEPS, "devices": d, "kernel_mode": "standard"} for d in (1, 4)]
    out = _run(_spec(tmp_path, corpus, runs), _env(**EIGHT))
    a, b = _leaves(out[0]["run_dir"]), _leaves(out[1]["run_dir"])
    assert not _same_bits(a, b)
    assert all(np.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_bitwise_like_one(corpus, tmp_path):
    """Two CPU processes on 127.0.0.1 (one device each, DP=2 across them, each reading
    its own shards through 2 canonical readers) end with the parameters of one process
    training on the same global batches (DP=1, the same 2 readers)."""
    run = {"steps": STEPS, "readers": 2}
    single = _spec(tmp_path, corpus, [{"run_dir": "single", **run}], "single.json")
    pair = _spec(tmp_path, corpus, [{"run_dir": "pair", **run}], "pair.json")
    coord = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([*WORKER, str(pair)], cwd=REPO,
                              env=_env(TML_COORD=coord, TML_NPROC="2", TML_PID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        one = _run(single, _env())
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-6000:]
    results = [json.loads(o.split("RESULT ", 1)[1]) for o, _ in outs]
    assert [r["process_index"] for r in results] == [0, 1] and results[0]["mesh"]["data"] == 2
    assert one[0]["mesh"]["data"] == 1
    assert _same_bits(_leaves(results[0]["run_dir"]), _leaves(one[0]["run_dir"]))


def test_micro_batches_must_split_over_the_data_parallel_ranks():
    from jax.sharding import AbstractMesh

    from tml.parallel import AXES
    from tml.train.step import make_train_step

    mesh = AbstractMesh((4, 1, 1, 1), AXES)
    with pytest.raises(ValueError, match=r"train.micro_batches=2 must be a multiple of the data-parallel degree 4"):
        make_train_step(None, None, None, 0.0, micro_batches=2, mesh=mesh)
    with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
        from tml.train.step import split_micro
        split_micro({"tokens": np.zeros((4, 8))}, 3)
