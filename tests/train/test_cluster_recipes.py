"""The `cluster` and `experiment` recipe groups: every option composes and validates against
the schema, the SLURM recipe writes the intended sbatch script, the TPU-pod launch script
builds the intended gcloud command, and the submitit launcher (local mode) runs a tiny
training job end to end through `tml train`."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf, open_dict

from tml.config import TmlConfig, register_configs

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
CLUSTERS = sorted(p.stem for p in (RECIPES / "cluster").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (RECIPES / "experiment").glob("*.yaml"))
LAUNCHERS = {
    "local": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "tpu_pod": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}
TML = [sys.executable, "-m", "tml.cli"]


def _compose(overrides: list[str], hydra_config: bool = False):
    register_configs()
    with initialize_config_module("tml.recipes", version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


def _cluster(cfg) -> str:
    """The ``cluster/`` option Hydra selected (recorded in the run's ``.hydra/hydra.yaml``)."""
    return cfg.hydra.runtime.choices.cluster


def _validated(cfg) -> TmlConfig:
    """The schema's dataclasses from a composed config (its ``hydra`` node dropped)."""
    if "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TmlConfig)
    obj.model.validate()
    return obj


def test_the_groups_hold_the_documented_options():
    assert CLUSTERS == ["local", "slurm", "submitit_local", "tpu_pod"]
    assert EXPERIMENTS == ["small_gpu_pod", "tiny_cpu", "tml_interaction_small_tpu"]


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_every_cluster_composes_and_selects_its_launcher(cluster):
    cfg = _compose([f"cluster={cluster}"], hydra_config=True)
    h = cfg.hydra
    assert _cluster(cfg) == cluster
    assert h.launcher._target_ == LAUNCHERS[cluster]
    submitit = cluster in ("slurm", "submitit_local")
    # submitit launchers only apply to multirun: those recipes turn it on themselves
    assert (str(h.mode) == "RunMode.MULTIRUN") == submitit
    if cluster == "slurm":
        assert h.launcher.tasks_per_node == h.launcher.gpus_per_node  # one process per GPU
        assert h.launcher.partition is None and h.launcher.signal_delay_s > 0
    cfg = _validated(cfg)
    assert cfg.distributed.mode == ("tpu" if cluster == "tpu_pod" else "auto")
    if cluster == "tpu_pod":
        assert cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize("cluster", [None, *CLUSTERS])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_on_every_cluster(experiment, cluster):
    overrides = [f"+experiment={experiment}"] + ([f"cluster={cluster}"] if cluster else [])
    composed = _compose(overrides, hydra_config=True)
    expected = {"tiny_cpu": ("tiny", "local"), "small_gpu_pod": ("small", "slurm"),
                "tml_interaction_small_tpu": ("tml_interaction_small", "tpu_pod")}[experiment]
    assert _cluster(composed) == (cluster or expected[1])  # the command line wins
    cfg = _validated(composed)
    assert cfg.model.name == expected[0]
    assert cfg.optim.resolved(cfg.train.steps).total_steps == cfg.train.steps  # the cosine ends with the run
    if experiment != "tiny_cpu":
        assert cfg.model.dtype == "bfloat16"


def test_tiny_cpu_spells_out_the_default_recipe():
    assert (OmegaConf.to_container(_compose(["+experiment=tiny_cpu"]), resolve=True)
            == OmegaConf.to_container(_compose([]), resolve=True))


def test_a_typo_in_an_experiment_or_cluster_lists_the_options(tmp_path):
    r = subprocess.run([*TML, "train", "+experiment=tiny_cpux"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    out = r.stderr + r.stdout
    assert r.returncode != 0
    assert "Could not find 'experiment/tiny_cpux'" in out
    assert all(e in out for e in EXPERIMENTS)
    with pytest.raises(MissingConfigException, match="cluster/slrum") as e:
        _compose(["cluster=slrum"])
    assert all(c in str(e.value) for c in CLUSTERS)
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_slurm_recipe_writes_the_intended_sbatch_script(tmp_path, monkeypatch):
    """The real Hydra launcher and submitit executor, stopped right before `sbatch`."""
    import submitit
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks srun exists
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = _compose(["cluster=slurm", "hydra.launcher.nodes=2", "hydra.launcher.partition=gpu",
                    f"hydra.sweep.dir={tmp_path}/sweep"], hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    seen = {}

    class Stop(Exception):
        pass

    def map_array(executor, fn, *args):
        seen["sbatch"] = executor._executor._make_submission_file_text("python -m job", "0")
        raise Stop

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    with pytest.raises(Stop):
        launcher.launch([["model=small"]], initial_job_idx=0)
    sbatch = seen["sbatch"]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "#SBATCH --time=1440",
                 "#SBATCH --signal=TERM@120",  # the trainer's final-checkpoint signal
                 "export SUBMITIT_PREEMPT_SIGNAL=TERM"):
        assert line in sbatch.splitlines(), (line, sbatch)
    assert "srun --unbuffered" in sbatch


def test_tpu_pod_launch_script_dry_run():
    script = str(ROOT / "scripts" / "launch_tpu_pod.sh")
    r = subprocess.run(["bash", script, "--tpu", "pod-1", "--zone", "us-east5-a", "--dry-run",
                        "--", "+experiment=tml_interaction_small_tpu", "train.run_dir=/mnt/a b"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1",
                        "--zone=us-east5-a", "--worker=all"]
    assert argv[8] == "--command"
    remote = shlex.split(argv[9])
    assert remote == ["cd", "tml", "&&", ".venv/bin/tml", "train", "cluster=tpu_pod",
                      "+experiment=tml_interaction_small_tpu", "train.run_dir=/mnt/a b"]
    bad = subprocess.run(["bash", script, "--dry-run", "train.steps=1"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "--tpu and --zone are required" in bad.stderr


@pytest.mark.slow
def test_submitit_local_runs_a_tiny_training_job(tmp_path):
    """`tml train cluster=submitit_local ...`: the job runs in a separate submitit process
    (the task function pickled by the launcher) and trains."""
    run_dir, sweep = tmp_path / "run", tmp_path / "sweep"
    args = ["train", "-m", "cluster=submitit_local",
            "train.steps=2", "train.batch_size=2", "train.eval_every=0", "train.measure_peak=false",
            # the launcher is under test, not the model: the least there is to compile
            "model.n_layers=1", "model.n_experts=0", "model.vision_layers=1",
            "train.kernel_mode=standard",
            "loader.row_length=128", "loader.max_patches_per_row=8",
            "logging.log_every=1", "logging.progress_bar=false", "logging.wandb.mode=disabled",
            "checkpoint.save_every=0",
            "data.n_conversations=2", "data.eval_conversations=1", "data.workers=1",
            f"data.out_dir={tmp_path}/data", f"train.run_dir={run_dir}", f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([*TML, *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert r.returncode == 0, (r.stderr + logs)[-4000:]
    assert "Submitit 'local' sweep output dir" in r.stderr + r.stdout
    (result,) = sweep.glob(".submitit/*/*_0_result.pkl")
    status, job_return = pickle.loads(result.read_bytes())
    assert status == "success" and job_return.status.name == "COMPLETED", job_return
    assert "Job completed successfully" in logs
    assert OmegaConf.load(sweep / "0" / ".hydra" / "hydra.yaml").hydra.runtime.choices.cluster == "submitit_local"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2


def test_the_default_recipe_is_the_dataclass_defaults():
    """One source per default: composing the default recipe adds nothing to the schema's
    dataclass defaults (the model group aside: ``tiny`` is ModelConfig plus its MoE)."""
    cfg, defaults = _validated(_compose([])), TmlConfig()
    for name in ("data", "loader", "bench", "train", "optim", "checkpoint", "logging",
                 "distributed", "parallel"):
        assert getattr(cfg, name) == getattr(defaults, name), name


@pytest.mark.parametrize("group", ["model", "data", "loader", "train", "optim"])
def test_group_options_hold_only_what_differs_from_the_dataclass(group):
    schema = type(getattr(TmlConfig(), group))
    for path in sorted((RECIPES / group).glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path))
        raw.pop("defaults", None)
        same = [k for k, v in raw.items() if v == getattr(schema(), k)]
        assert not same, f"{path.name} repeats the defaults of {schema.__name__}: {same}"
