"""Training throughput: the real jitted train step of model recipes in both kernel modes.

    python -m tml.train.bench                           # tiny and small, bench_results/train.json
    python -m tml.train.bench --models tiny --repeats 5 --out /tmp/train.json
    python -m tml.train.bench --quick --no-memory       # a smoke run (tiny shapes, one sample)

For each model the full recipe is composed with Hydra as ``tml train model=<name>`` composes
it (model, optimizer, loss weights, loader shapes). The step is the trainer's own:
``make_train_step(graphdef, make_optimizer(cfg.optim.resolved(train.steps)), LossWeights(...), balance_rate,
micro_batches=...)``,
jitted as the trainer runs it (``TrainStep.jit``: gradients and update as two programs, the
state donated), fed a packed batch of the loader's keys and dtypes
(:func:`tml.model.bench.make_batch`: random micro-turns through the real layout and packer,
already on the device), ``train.micro_batches`` canonical micro-batches, one device (no mesh).

Per model, one jit per kernel mode (the mode is read at trace time), each compiled ahead
of time (the compile time is reported) and run once to warm up; then the modes are timed
*interleaved* in one run (A B B A A B ...: machine noise hits both), ``--repeats`` samples
per mode, each the mean of ``--steps`` consecutive steps (the metrics fetched to the host
every step, as the trainer does). Reported: the median sample (and the best), tokens/s
(every position of the packed rows, padding included), the ratio batch_invariant /
standard (target <= 1.10), the model FLOPs of a step (:func:`tml.model.count.train_step_flops`)
and MFU against the float32 matmul peak measured in the same run (before and after the
timings; the larger is used). Target: MFU >= 30% on ``small``.

Shapes: ``tiny`` uses the default recipe's (``train.batch_size`` x ``loader.row_length``,
``loader.max_patches_per_row`` patch slots: 4 x 512, 32); ``small`` one row of 1024 with
64 patch slots (the loader recipe's row; a step of 2 x 1024 takes ~30 s on a 2-core CPU).
``--batch`` / ``--row-length`` / ``--patches`` override them for every model.

Peak memory: ``tml train`` of the default recipe (``tiny``) runs a few steps in a
subprocess (no eval, no wandb, a temporary run directory); its peak RSS (``VmHWM``) is
reported against the 4 GiB target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("batch_invariant", "standard")
DEFAULT_MODELS = ("tiny", "small")
# rows, row_length, patch slots per row; None = the composed recipe's (train / loader)
SHAPES = {"small": (1, 1024, 64)}
QUICK_SHAPE = (2, 128, 4)
TARGETS = {"ratio_batch_invariant_over_standard_max": 1.10, "mfu_small_min": 0.30,
           "peak_rss_gib_max": 4.0}
MEMORY_STEPS = 3


def compose_recipe(overrides: list[str] = ()):
    """The :class:`tml.config.TmlConfig` that ``tml <command> <overrides>`` runs with."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from tml.config import register_configs

    register_configs()
    with initialize_config_module("tml.recipes", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def _copy(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def make_attention_program(model_cfg, segment_ids, micro: int, seed: int = 0):
    """The attention kernel calls of one train step alone, forward and backward, at the
    step's shapes: for each decoder layer (its window from ``resolved_layer_types``) and
    each of the ``micro`` micro-batches of ``segment_ids`` [rows, T], ``tml.kernels.attention``
    of random q [rows/micro, T, n_heads, head_dim], k, v [.., n_kv_heads, head_dim] (the
    model's compute dtype) with the batch's segments, and its vjp of a random cotangent.

    -> (fn, args): ``fn(*args)`` returns every output and gradient (jit it under a kernel
    mode; the mode is read at trace time). Inputs differ per layer, so nothing is shared."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tml import kernels

    rows, T = segment_ids.shape
    B = rows // micro
    windows = [model_cfg.sliding_window if t == "sliding" else None for t in model_cfg.resolved_layer_types()]
    dt = model_cfg.compute_dtype()
    rng = np.random.default_rng(seed)
    n, hq, hkv, hd = len(windows), model_cfg.n_heads, model_cfg.n_kv_heads, model_cfg.head_dim

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dt)

    args = (rand(n, micro, B, T, hq, hd), rand(n, micro, B, T, hkv, hd), rand(n, micro, B, T, hkv, hd),
            rand(n, micro, B, T, hq, hd), jnp.asarray(segment_ids).reshape(micro, B, T))

    def fn(q, k, v, dout, seg):
        res = []
        for i, w in enumerate(windows):
            for m in range(micro):
                def f(q, k, v, s=seg[m], w=w):
                    return kernels.attention(q, k, v, q_segment_ids=s, kv_segment_ids=s, sliding_window=w)

                out, vjp = jax.vjp(f, q[i, m], k[i, m], v[i, m])
                res.append((out, *vjp(dout[i, m])))
        return res

    return fn, args


def bench_model(name: str, *, steps: int, repeats: int, shape: tuple | None, seed: int = 0,
                progress=None, log=print) -> dict:
    """Compile and time the train step of recipe ``name`` in both kernel modes, interleaved."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tml import kernels
    from tml.bench_report import count_compiles
    from tml.model.bench import ALIGN, make_batch
    from tml.model.count import count_params, forward_flops, train_step_flops
    from tml.model.loss import LossWeights
    from tml.model.model import InteractionModel
    from tml.train.optim import make_optimizer
    from tml.train.state import TrainState
    from tml.train.step import make_train_step

    cfg = compose_recipe([f"model={name}"])
    tc = cfg.train
    rows, row_length, patches = shape or SHAPES.get(name) or (
        tc.batch_size, cfg.loader.row_length, cfg.loader.max_patches_per_row)
    micro = tc.micro_batches if rows % tc.micro_batches == 0 else 1
    batch_np = make_batch(rows, row_length, patches, seed=seed)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    tokens = rows * row_length
    flops = train_step_flops(cfg.model, rows=rows, row_length=row_length, patches_per_row=patches)
    counts = count_params(cfg.model)
    attn_fn, attn_args = make_attention_program(cfg.model, batch_np["segment_ids"], micro, seed)

    t = time.perf_counter()
    model = InteractionModel(cfg.model, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg.optim.resolved(tc.steps))
    weights = LossWeights(tc.loss_text, tc.loss_speech, tc.loss_control)
    init_s = time.perf_counter() - t
    log(f"[{name}] {counts['total'] / 1e6:.1f}M params ({counts['active'] / 1e6:.1f}M active), "
        f"{rows} x {row_length} tokens, {patches} patch slots/row, micro-batches {micro}, "
        f"{flops / 1e9:.1f} GFLOP/step, init {init_s:.1f}s")

    runs = {}
    for mode in MODES:
        p = _copy(params)
        state = TrainState.create(p, _copy(rest), tx.init(p), jax.random.key(seed))
        step = make_train_step(graphdef, tx, weights, cfg.model.balance_rate, micro_batches=micro).jit()
        with kernels.kernel_mode(mode):
            t = time.perf_counter()
            state, met, _ = step(state, batch)      # compiles both programs, then runs
            jax.device_get(met)
            compile_s = first_s = time.perf_counter() - t
        compiled = step
        with kernels.kernel_mode(mode):
            attn = jax.jit(attn_fn).lower(*attn_args).compile()
        jax.block_until_ready(attn(*attn_args))
        runs[mode] = {"fn": compiled, "state": state, "compile_s": compile_s, "first_step_s": first_s,
                      "samples_s": [], "loss": float(met["loss"]), "attention": attn, "attention_samples_s": [],
                      "compiled_while_timing": []}
        log(f"[{name}] {mode:<15} compiled in {compile_s:.1f}s, first step {first_s:.2f}s")
        if progress is not None:
            progress.update(1)

    for r in range(repeats):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            run = runs[mode]
            # under the mode it was compiled in: the mode is part of jit's cache key, so a
            # call outside it would trace and compile the step again for the default mode
            with kernels.kernel_mode(mode), count_compiles() as compiled:
                t = time.perf_counter()
                for _ in range(steps):
                    run["state"], met, _ = run["fn"](run["state"], batch)
                    jax.device_get(met)
                run["samples_s"].append((time.perf_counter() - t) / steps)
                run["loss"] = float(met["loss"])
                t = time.perf_counter()
                for _ in range(steps):
                    jax.block_until_ready(run["attention"](*attn_args))
                run["attention_samples_s"].append((time.perf_counter() - t) / steps)
            run["compiled_while_timing"] += compiled
            if progress is not None:
                progress.update(1)

    out_modes = {}
    for mode, run in runs.items():
        med = statistics.median(run["samples_s"])
        attn = statistics.median(run["attention_samples_s"])
        out_modes[mode] = {
            "attention_s_median": attn, "attention_samples_s": run["attention_samples_s"],
            "attention_share": attn / med,
            "step_s_median": med, "step_s_best": min(run["samples_s"]), "samples_s": run["samples_s"],
            "tokens_per_s": tokens / med, "model_flops_per_s": flops / med,
            "compile_s": run["compile_s"], "first_step_s": run["first_step_s"],
            "last_loss": run["loss"], "compiled_while_timing": run["compiled_while_timing"]}
        if run["compiled_while_timing"]:
            log(f"[{name}] WARNING {mode}: {len(run['compiled_while_timing'])} programs compiled while timing "
                f"({', '.join(run['compiled_while_timing'][:4])}): its samples include compile time")
        log(f"[{name}] {mode:<15} median {med * 1e3:9.1f} ms/step ({tokens / med:8.0f} tok/s), "
            f"best {min(run['samples_s']) * 1e3:.1f} ms; attention fwd+bwd alone {attn * 1e3:.1f} ms "
            f"({attn / med:.0%} of the step)")
    bi, sd = out_modes["batch_invariant"], out_modes["standard"]
    return {
        "model": name,
        "shape": {"rows": rows, "row_length": row_length, "patches_per_row": patches,
                  "micro_batches": micro, "align": ALIGN},
        "tokens_per_step": tokens,
        "real_tokens_per_step": int((batch_np["segment_ids"] > 0).sum()),
        "video_patches_per_step": int((batch_np["patch_index"] >= 0).sum()),
        "params_total": counts["total"], "params_active": counts["active"],
        "model_flops_per_step": flops,
        "forward_flops_by_part": forward_flops(cfg.model, rows=rows, row_length=row_length,
                                               patches_per_row=patches),
        "six_n_active_flops_per_step": 6 * counts["active"] * tokens,
        "steps_per_sample": steps, "repeats": repeats,
        "modes": out_modes,
        "ratio_batch_invariant_over_standard": bi["step_s_median"] / sd["step_s_median"],
        "ratio_best_batch_invariant_over_standard": bi["step_s_best"] / sd["step_s_best"],
    }


def _vm_hwm(pid: int) -> int | None:
    """``VmHWM`` of ``/proc/<pid>/status`` in bytes (None where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_and_measure_rss(cmd: list[str], *, cwd=None, env=None, log_path=None, poll_s: float = 0.05) -> dict:
    """Run ``cmd`` to completion; its peak resident set, wall time and exit code.

    The peak is the child's ``VmHWM`` (its own high-water mark since ``exec``), polled
    every ``poll_s`` until it exits (only a peak reached in the last interval is missed).
    ``wait4``'s ``ru_maxrss`` is kept as ``ru_maxrss_bytes`` but is not the peak: Linux
    folds the pre-``exec`` copy of the *parent* into it, so a child started from a process
    holding gigabytes reports gigabytes (it is used only where /proc is missing)."""
    t = time.perf_counter()
    with open(log_path, "wb") if log_path else contextlib.nullcontext(subprocess.DEVNULL) as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        hwm = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = _vm_hwm(proc.pid)
            if now is not None:
                hwm = max(hwm or 0, now)
            time.sleep(poll_s)
        proc.returncode = os.waitstatus_to_exitcode(status)
    peak = hwm if hwm is not None else usage.ru_maxrss * 1024
    return {"peak_rss_bytes": peak, "peak_rss_gib": peak / 2**30, "peak_rss_source":
            "VmHWM" if hwm is not None else "ru_maxrss", "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "wall_s": time.perf_counter() - t, "returncode": proc.returncode}


def measure_train_memory(overrides: list[str] = (), steps: int = MEMORY_STEPS, log=print) -> dict:
    """Peak RSS of ``tml train`` (the default recipe unless ``overrides``) for ``steps`` steps.

    The corpus is the recipe's ``data.out_dir`` when it is already built, else the default
    corpus built first into a temporary folder (in its own subprocess, so the build does
    not count toward the trainer's peak)."""
    from tml.data_pipelines.shards import MANIFEST

    cfg = compose_recipe(list(overrides))
    cli = [sys.executable, "-m", "tml.cli"]
    with tempfile.TemporaryDirectory(prefix="tml-train-bench-") as tmp:
        data = [o for o in overrides if o.startswith("data.")]
        if not (Path(cfg.data.out_dir) / MANIFEST).exists():
            corpus = str(Path(tmp) / "corpus")
            data = [f"data.out_dir={corpus}"]
            log(f"[memory] building the default corpus into {corpus}")
            build = run_and_measure_rss(cli + ["data", "build", *data, *overrides,
                                               f"hydra.run.dir={tmp}/hydra-build", "hydra.output_subdir=null"])
            if build["returncode"]:
                raise RuntimeError(f"tml data build failed ({build['returncode']})")
        args = [f"train.steps={steps}", "train.eval_every=0", "train.resume=false",
                f"train.run_dir={tmp}/run", "checkpoint.save_every=0", "logging.log_every=1",
                "logging.wandb.mode=disabled", "logging.progress_bar=false",
                f"hydra.run.dir={tmp}/hydra", "hydra.output_subdir=null"]
        args += [o for o in overrides if not o.startswith("data.")] + data
        log(f"[memory] tml train {' '.join(args)}")
        log_path = Path(tmp) / "train.log"
        res = run_and_measure_rss(cli + ["train", *args], log_path=log_path)
        if res["returncode"]:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"tml train failed ({res['returncode']}):\n{tail}")
        from tml.train.metrics_log import read_metrics

        metrics = read_metrics(f"{tmp}/run")
    last = metrics[-1] if metrics else {}
    res |= {"command": "tml train " + " ".join(args), "steps": steps,
            "shape": {"rows": cfg.train.batch_size, "row_length": cfg.loader.row_length,
                      "patches_per_row": cfg.loader.max_patches_per_row},
            "model": cfg.model.name, "kernel_mode": cfg.train.kernel_mode,
            "trainer_last_step": {k: last.get(k) for k in ("step", "step_seconds", "tokens_per_s", "mfu", "loss")}}
    log(f"[memory] peak RSS {res['peak_rss_gib']:.2f} GiB, {res['wall_s']:.0f}s wall")
    return res


def format_table(results: list[dict], peak: float, memory: dict | None) -> str:
    head = (f"{'model':<7}{'rows x len, patches':>21}{'GFLOP/step':>11}{'bi ms':>10}{'std ms':>10}"
            f"{'ratio':>7}{'bi tok/s':>10}{'std tok/s':>10}{'bi MFU':>8}{'std MFU':>8}{'attn bi/std':>13}"
            f"{'compile bi/std':>16}")
    lines = [head, "-" * len(head)]
    for r in results:
        s, bi, sd = r["shape"], r["modes"]["batch_invariant"], r["modes"]["standard"]
        shape = f"{s['rows']} x {s['row_length']}, {s['patches_per_row']}"
        lines.append(
            f"{r['model']:<7}{shape:>21}{r['model_flops_per_step'] / 1e9:>11.1f}"
            f"{bi['step_s_median'] * 1e3:>10.1f}{sd['step_s_median'] * 1e3:>10.1f}"
            f"{r['ratio_batch_invariant_over_standard']:>7.2f}{bi['tokens_per_s']:>10.0f}{sd['tokens_per_s']:>10.0f}"
            f"{bi['mfu']:>8.1%}{sd['mfu']:>8.1%}{bi['attention_share']:>8.0%}/{sd['attention_share']:<4.0%}"
            f"{bi['compile_s']:>9.0f}s/{sd['compile_s']:.0f}s")
    lines.append("attn: the step's attention kernel calls alone (forward + backward, every layer and "
                 "micro-batch) / the step")
    lines.append(f"float32 matmul peak (measured): {peak / 1e9:.1f} GFLOP/s")
    if memory:
        s = memory["shape"]
        lines.append(f"peak RSS of `tml train` ({memory['model']}, {s['rows']} x {s['row_length']}, "
                     f"{memory['steps']} steps): {memory['peak_rss_gib']:.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import jax

    from tml.bench_report import environment, write_report
    from tml.train.metrics_log import measure_matmul_peak_flops

    p = argparse.ArgumentParser(prog="python -m tml.train.bench", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model recipes (default: tiny small)")
    p.add_argument("--out", default="bench_results/train.json", help="JSON output path")
    p.add_argument("--steps", type=int, default=None, help="steps per timed sample (default 3; small 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per mode (default 3)")
    p.add_argument("--batch", type=int, default=None, help="rows per step, every model")
    p.add_argument("--row-length", type=int, default=None, help="positions per row, every model")
    p.add_argument("--patches", type=int, default=None, help="video patch slots per row, every model")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS run of `tml train`")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_SHAPE[0]} x {QUICK_SHAPE[1]} rows, one sample of one step")
    args = p.parse_args(argv)

    repeats = args.repeats or (1 if args.quick else 3)
    override = None
    if args.quick or args.batch or args.row_length or args.patches is not None:
        base = QUICK_SHAPE if args.quick else (None, None, None)
        override = (args.batch or base[0], args.row_length or base[1],
                    args.patches if args.patches is not None else base[2])

    def shape_for(name: str):
        if override is None:
            return None
        cfg = compose_recipe([f"model={name}"])
        default = SHAPES.get(name) or (cfg.train.batch_size, cfg.loader.row_length, cfg.loader.max_patches_per_row)
        return tuple(o if o is not None else d for o, d in zip(override, default))

    def steps_for(name: str) -> int:
        return args.steps or (1 if args.quick or name in SHAPES else 3)

    from tqdm.auto import tqdm

    env = environment()
    total = len(args.models) * (len(MODES) + len(MODES) * repeats) + 2 + (not args.no_memory)
    bar = tqdm(total=total, unit="task", file=sys.stderr, dynamic_ncols=True)
    log = bar.write
    peak_kw = {"sizes": (256, 512), "repeats": 2} if args.quick else {}
    peaks = [measure_matmul_peak_flops(**peak_kw)]
    bar.update(1)
    log(f"float32 matmul peak: {peaks[0] / 1e9:.1f} GFLOP/s")
    results = [bench_model(name, steps=steps_for(name), repeats=repeats, shape=shape_for(name),
                           progress=bar, log=log) for name in args.models]
    peaks.append(measure_matmul_peak_flops(**peak_kw))
    bar.update(1)
    peak = max(peaks)
    for r in results:
        for m in r["modes"].values():
            m["mfu"] = m["model_flops_per_s"] / peak
    memory = None
    if not args.no_memory:
        memory = measure_train_memory(log=log)
        bar.update(1)
    bar.close()

    table = format_table(results, peak, memory)
    print()
    print(table)
    met = {}
    for r in results:
        met[f"{r['model']}_ratio"] = (r["ratio_batch_invariant_over_standard"]
                                      <= TARGETS["ratio_batch_invariant_over_standard_max"])
        if r["model"] == "small":
            met["small_mfu"] = r["modes"]["batch_invariant"]["mfu"] >= TARGETS["mfu_small_min"]
    if memory:
        met["peak_rss"] = memory["peak_rss_gib"] <= TARGETS["peak_rss_gib_max"]
    out = {"command": "python -m tml.train.bench " + " ".join(sys.argv[1:] if argv is None else argv),
           "environment": env, "jax_devices": len(jax.devices()),
           "peak_flops": peak, "peak_flops_samples": peaks,
           "mfu_note": "model FLOPs (tml.model.count.train_step_flops: causal attention counted as the "
                       "visible half, hMLP per patch slot) / median step time / measured float32 matmul peak",
           "targets": TARGETS, "targets_met": met,
           "results": results, "memory": memory, "table": table.splitlines()}
    write_report(args.out, out)
    return out


if __name__ == "__main__":
    main()
