"""tml.train.distributed: start-up planning for every environment, and two real local CPU
processes on 127.0.0.1 (explicit flags and SLURM auto-detection)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tml.train.distributed import DistributedConfig, init_distributed, plan_distributed

REPO = Path(__file__).resolve().parents[2]  # the worker runs as ``python -m tests.train.…`` from here

SLURM_2 = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_plan_single_process_is_a_no_op():
    assert plan_distributed(DistributedConfig(), {}, has_libtpu=False).source == "single"
    # an sbatch shell or a one-task step is still a single process
    one_task = {**SLURM_2, "SLURM_NTASKS": "1"}
    assert plan_distributed(DistributedConfig(), one_task, has_libtpu=False).source == "single"
    no_step = {k: v for k, v in SLURM_2.items() if k != "SLURM_STEP_NODELIST"}
    assert plan_distributed(DistributedConfig(), no_step, has_libtpu=False).source == "single"
    # TPU variables without libtpu (e.g. a CPU container) do not count
    assert plan_distributed(DistributedConfig(), {"TPU_WORKER_ID": "0"}, has_libtpu=False).source == "single"
    assert plan_distributed(DistributedConfig(mode="off"), SLURM_2, has_libtpu=True).source == "single"
    # libtpu's placeholders (what it writes into the environment when it starts on a host
    # that is not a TPU VM, and what every child process then inherits) do not count
    placeholders = {
        "TPU_WORKER_ID": "WARNING: could not determine TPU worker number, please set env var "
                         "`TPU_WORKER_ID` manually, otherwise libtpu.so may not properly initialize.",
        "TPU_ACCELERATOR_TYPE": "WARNING: could not determine TPU accelerator type, please set env "
                                "var `TPU_ACCELERATOR_TYPE` manually",
        "TPU_WORKER_HOSTNAMES": ""}
    assert plan_distributed(DistributedConfig(), placeholders, has_libtpu=True).source == "single"
    assert plan_distributed(DistributedConfig(), {**placeholders, "TPU_WORKER_ID": "0"},
                            has_libtpu=True).source == "tpu"
    assert init_distributed(DistributedConfig(mode="off")).process_count == 1


def test_plan_slurm_tpu_and_explicit():
    p = plan_distributed(DistributedConfig(), SLURM_2, has_libtpu=False)
    assert p.source == "slurm" and p.kwargs["cluster_detection_method"] == "slurm"
    p = plan_distributed(DistributedConfig(), {"TPU_WORKER_HOSTNAMES": "a,b"}, has_libtpu=True)
    assert p.source == "tpu" and "coordinator_address" not in p.kwargs
    explicit = DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)
    p = plan_distributed(explicit, SLURM_2, has_libtpu=True)  # explicit flags win
    assert p.source == "explicit" and p.kwargs == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
        "cluster_detection_method": "deactivate", "initialization_timeout": 300}


def test_plan_errors_name_the_missing_keys():
    with pytest.raises(ValueError, match="missing: distributed.num_processes, distributed.process_id"):
        plan_distributed(DistributedConfig(mode="explicit", coordinator_address="h:1"), {})
    with pytest.raises(ValueError, match=r"process_id=3 is not in \[0, distributed.num_processes=2\)"):
        plan_distributed(DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=3), {})
    with pytest.raises(ValueError, match="not a SLURM job step"):
        plan_distributed(DistributedConfig(mode="slurm"), {})
    with pytest.raises(ValueError, match="distributed.mode must be one of"):
        plan_distributed(DistributedConfig(mode="mpi"), {})


def _free_port(lo: int | None = None, hi: int | None = None) -> int:
    """A port nobody listens on: the OS's choice, or a random free one in [lo, hi]."""
    if lo is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for port in random.sample(range(lo, hi + 1), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{lo}, {hi}]")


def _run_pair(tmp_path, envs: list[dict]) -> list[dict]:
    procs = []
    for env in envs:
        full = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "TML_", "XLA_FLAGS"))}
        full.update(JAX_PLATFORMS="cpu", **env)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.train.distributed_worker", str(tmp_path / "ck")], cwd=REPO,
            env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-4000:]
            outs.append(json.loads(out.split("RESULT ", 1)[1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def _check_pair(outs: list[dict], source: str) -> None:
    for pid, o in enumerate(outs):
        assert o["source"] == source and o["process_index"] == pid
        assert o["process_count"] == 2 and o["device_count"] == 2
        assert o["allgather"] == [1, 11]                        # both processes agree
        assert o["sharded_sum"] == float(sum(range(4)) + sum(range(100, 104)))
        assert o["restore_bitwise"] is True
        assert o["data_state"] == {"epoch": 0, "shard_pos": pid}  # each gets its own
        # SIGUSR1 reached process 1 only, at step 4; both stopped at the next agreement
        # point (sync_every=2) and saved that step together
        assert o["preempted_at"] == 5 and o["latest_after_preemption"] == 5


def test_two_processes_explicit_flags(tmp_path):
    """Two CPU processes on 127.0.0.1 started with explicit coordinator/num/id flags."""
    coord = f"127.0.0.1:{_free_port()}"
    outs = _run_pair(tmp_path, [{"TML_COORD": coord, "TML_NPROC": "2", "TML_PID": str(i)}
                                for i in range(2)])
    _check_pair(outs, "explicit")


def test_two_processes_slurm_auto_detection(tmp_path):
    """The same two processes started with nothing but (simulated) SLURM step variables:
    auto mode detects SLURM and JAX derives coordinator, count and ids from them."""
    port = _free_port(61440, 65535)  # JAX's SLURM port = 61440 + job_id % 4096
    slurm = {"SLURM_JOB_ID": str(port - 61440), "SLURM_STEP_NODELIST": "localhost",
             "SLURM_NTASKS": "2"}
    outs = _run_pair(tmp_path, [{**slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}
                                for i in range(2)])
    _check_pair(outs, "slurm")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None and os.environ.get("CI") != "true",
                    reason="libtpu not installed (pip install 'tml[tpu-aot]'); CI installs it")
def test_a_child_of_a_jax_process_with_libtpu_starts_as_one_process():
    """With libtpu installed, a process that starts JAX on a host that is not a TPU VM gets
    libtpu's placeholders in its C environment (``TPU_WORKER_ID=WARNING: could not ...``);
    a ``tml`` command it launches (``tml.train.bench``'s memory run, a notebook's
    subprocess) inherits them and must still start as one process."""
    assert importlib.util.find_spec("libtpu") is not None, "CI=true: .ci/run installs tml[tpu-aot]"
    child = ("from tml.train.distributed import init_distributed; import os; "
             "print('RESULT', init_distributed().source, os.environ.get('TPU_WORKER_ID', '')[:7])")
    parent = ("import jax, subprocess, sys; jax.devices(); "
              f"sys.exit(subprocess.run([sys.executable, '-c', {child!r}]).returncode)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "XLA_FLAGS") and not k.startswith(("TPU_", "CLOUD_TPU_"))}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # this pytest process may hold libtpu's lock
    res = subprocess.run([sys.executable, "-c", parent], check=False, cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RESULT single WARNING" in res.stdout, res.stdout  # the placeholder was inherited
