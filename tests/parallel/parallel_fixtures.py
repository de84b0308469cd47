"""Shared by the parallel tests and their 8-device helpers: the tiny test model of
tests/model/tiny_model.py with cheap deterministic weights, packed rows made like its
make_batch, and the launching and collecting of helper subprocesses.

Weights are drawn with numpy rather than the model's initialiser: initialising under
JAX compiles the random ops (10-15 s on this machine, again in every subprocess);
the parallel tests compare sharded and unsharded runs of the *same* weights, so any
reasonable values do.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.model.tiny_model import ALIGN, CFG, PATCHES, ROW

N_ROWS = 8


def make_rows(seed: int = 0, n_rows: int = N_ROWS) -> dict:
    """``n_rows`` packed rows of ``ROW`` tokens (numpy), like tiny_model.make_batch."""
    from tests.stream.random_turns import random_turns
    from tml.stream import layout, pack

    rng = np.random.default_rng(seed)
    seqs = []
    while True:
        seqs += [layout(random_turns(rng, 3)) for _ in range(4 * n_rows)]
        rows = pack(seqs, ROW, PATCHES, align=ALIGN).as_dict()
        if rows["tokens"].shape[0] >= n_rows:
            return {k: v[:n_rows] for k, v in rows.items()}


def numpy_model(cfg=CFG, seed: int = 0):
    """An InteractionModel with numpy-drawn weights: N(0, 1/fan_in) matrices, norm
    scales 1 + N(0, 0.1^2), other variables (the MoE balance bias) zero."""
    from tml.model.frontends import plan_out_scales
    from tml.model.model import InteractionModel

    graphdef, state = nnx.split(nnx.eval_shape(lambda: InteractionModel(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(v):
        if not isinstance(v, nnx.Variable):
            return np.zeros(v.shape, v.dtype)
        shape = v.shape
        if v.get_metadata().get("logical_axes") == ("norm",):
            val = 1.0 + 0.1 * rng.standard_normal(shape)
        elif isinstance(v, nnx.Param):
            val = rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1.0)
        else:
            val = np.zeros(shape)
        return v.replace(jnp.asarray(val, v.dtype))

    model = nnx.merge(graphdef, jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    model.hmlp.scales = plan_out_scales(cfg.temporal_patch_size, cfg.patch_size, cfg.vision_layers,
                                        cfg.n_channels)
    return model


# ------------------------------------------------ 8-device helper subprocesses
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch_groups(helper: str, groups, out: Path) -> dict:
    """Start ``python -m helper <group> <out/group>`` for each group, side by side, from the
    repository root with ``XLA_FLAGS`` removed (the helper sets its own device count).
    Returns {group: Popen}; pass it to :func:`collect_groups`."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return {g: subprocess.Popen([sys.executable, "-m", helper, g, str(out / g)], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for g in groups}


def collect_groups(procs: dict, out: Path, timeout: float) -> dict:
    """{group: (info json, {name: array})} the helpers wrote with :func:`save_results`;
    a helper that failed raises with its stderr's tail; every helper still running is killed."""
    try:
        results = {}
        for g, p in procs.items():
            _, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-4000:]
            results[g] = (json.loads((out / f"{g}.json").read_text()), dict(np.load(out / f"{g}.npz")))
        return results
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


def save_results(prefix: str, info: dict, arrays: dict) -> None:
    """A helper's results: ``prefix.npz`` (arrays) and ``prefix.json`` (info)."""
    np.savez(prefix + ".npz", **arrays)
    with open(prefix + ".json", "w") as fh:
        json.dump(info, fh)
