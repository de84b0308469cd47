"""The tml command (Hydra recipes validated at start-up) and the installed package layout."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TML = [sys.executable, "-m", "tml.cli"]


def run(*args, cwd=None):
    return subprocess.run([*TML, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_usage_lists_only_real_commands():
    r = run("--help")
    assert r.returncode == 0
    assert "tml data build" in r.stdout and "tml data summary" in r.stdout


def test_unknown_command_fails():
    r = run("data", "bild")
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_typo_in_a_key_names_the_key(tmp_path):
    r = run("data", "summary", "data.n_convs=3", cwd=tmp_path)
    assert r.returncode != 0
    assert "data.n_convs" in r.stderr + r.stdout and "not in 'DataConfig'" in r.stderr + r.stdout


def test_wrong_type_names_the_key(tmp_path):
    r = run("data", "summary", "loader.row_length=many", cwd=tmp_path)
    assert r.returncode != 0 and "loader.row_length" in r.stderr + r.stdout


def test_removed_keys_are_typos(tmp_path):
    """Rows per batch are train.batch_size (loader.batch_size is gone); where a run executes
    is the cluster/ group's launcher, not a schema node."""
    for key in ("loader.batch_size=4", "cluster.name=local"):
        r = run("data", "summary", key, cwd=tmp_path)
        assert r.returncode != 0 and key.split("=")[0].split(".")[-1] in r.stderr + r.stdout, key


def test_import_tml_config_starts_no_jax():
    """Composing a recipe is instant: the schema imports no JAX, Flax or Optax (the trainer
    imports them, and tml.config never imports the trainer)."""
    r = subprocess.run([sys.executable, "-c", "import sys, tml.config; assert not any("
                        "m.split('.')[0] in ('jax', 'flax', 'optax') for m in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_unknown_recipe_option_fails(tmp_path):
    r = run("data", "summary", "data=synthetik", cwd=tmp_path)
    assert r.returncode != 0 and "synthetik" in r.stderr + r.stdout


def test_summary_without_corpus_says_what_to_do(tmp_path):
    r = run("data", "summary", f"data.out_dir={tmp_path}/none", cwd=tmp_path)
    assert r.returncode != 0 and "tml data build" in r.stderr


@pytest.mark.slow
def test_wheel_maps_top_level_folders_into_the_tml_namespace(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("tml-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("tml-")}
    assert tops == {"tml"}, tops
    for mod in ("tml/kernels/__init__.py", "tml/kernels/pallas/__init__.py", "tml/eval/__init__.py", "tml/data_pipelines/__init__.py",
                "tml/recipes/config.yaml", "tml/recipes/data/synthetic.yaml"):
        assert mod in names, mod


def _installed(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(_installed("kernels") is None and os.environ.get("CI") != "true",
                    reason="the PyPI package `kernels` is not installed (transformers < 5.25)")
def test_the_repository_kernels_folder_never_shadows_the_installed_kernels_package():
    """transformers >= 5.25 imports the PyPI package `kernels` (hub kernels). Under pytest
    the repository root is appended to sys.path, so that package wins over tml's folder."""
    assert _installed("kernels"), "CI=true: a fresh install of the test extra pulls `kernels` (transformers >= 5.25)"
    origin = Path(importlib.util.find_spec("kernels").origin).resolve()
    assert origin.parent != ROOT / "kernels", f"`import kernels` finds tml's folder: {origin}"


def test_the_repository_kernels_folder_refuses_to_load_as_top_level_kernels():
    """A Python started in the repository root has the root first on sys.path and finds
    tml's kernels/ as `kernels`: it refuses, saying what to do, instead of loading a second
    copy of tml.kernels (or breaking transformers' import with a missing name)."""
    r = subprocess.run([sys.executable, "-c", "import kernels"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1
    assert "is tml's kernels/, imported as top-level 'kernels'" in r.stderr
    assert "Import tml.kernels" in r.stderr


def test_data_build_end_to_end_through_the_cli(tmp_path):
    out = tmp_path / "corpus"
    args = ["data", "build", f"data.out_dir={out}", "data.n_conversations=6", "data.eval_conversations=2",
            "data.conversations_per_shard=3", "data.workers=2"]
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "corpus: 8 conversations" in r.stdout and "train" in r.stdout and "eval" in r.stdout
    assert (out / "manifest.json").exists() and len(list(out.glob("*.tar"))) == 3
    again = run(*args, cwd=tmp_path)
    assert "shards written: 0, already finished: 3" in again.stdout
    other = run(*args[:-1], "data.seed=5", cwd=tmp_path)
    assert other.returncode != 0 and "another source" in other.stderr + other.stdout
