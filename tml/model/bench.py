"""Forward and forward+backward step time of model recipes in both kernel modes.

    python -m tml.model.bench                      # tiny and small, bench_results/model.json
    python -m tml.model.bench tiny --repeats 10 --out /tmp/model.json

For each recipe (``recipes/model/<name>.yaml`` merged onto :class:`ModelConfig`, as
``tml model params`` loads them) it builds one packed batch of realistic shape from
random micro-turns (user audio every micro-turn, video patches every few, some typed
text, model text / speech / silence / control — the real stream layout and packer),
then times, in ``batch_invariant`` and ``standard`` kernel mode side by side:

* ``forward``: ``model(batch)`` (all logits);
* ``fwd+bwd``: ``nnx.value_and_grad`` of the training loss (:func:`tml.model.loss.losses`)
  with respect to every parameter.

Each (mode, step) is jitted separately (the mode is read at trace time), run once to
compile (the compile time is reported), then timed ``repeats`` times; the best time is
reported (least disturbed by other processes). Throughput counts every position of the
packed rows (``tokens/s``), padding included; the share of real tokens is printed too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from tml.bench_report import environment, write_report
from tml.model.config import ModelConfig

DEFAULT_CONFIGS = ("tiny", "small")
BATCH = {"tiny": 4, "small": 2}          # rows per batch (others: 1)
ROW_LENGTH = 1024
MAX_PATCHES = 64
ALIGN = 64                              # segments start on attention-split boundaries
MODES = ("batch_invariant", "standard")
WORDS = ["hi", "okay", "wait", "three", "go", "so", "yes", "right", "look at this", "sure"]


def load_recipe(name: str) -> ModelConfig:
    """``recipes/model/<name>.yaml`` (or a path to a YAML file) as a validated ModelConfig."""
    from omegaconf import OmegaConf

    import tml.recipes

    path = Path(name)
    if not path.suffix:
        path = Path(tml.recipes.__file__).parent / "model" / f"{name}.yaml"
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)).validate()


def random_micro_turns(rng: np.random.Generator, n: int, video_every: int = 3) -> list:
    """``n`` random micro-turns: the user always heard (4 dMel frames), a frame pair of
    1-3 patches every ``video_every`` turns, the model speaking about half the time."""
    from tml.stream import MicroTurn

    turns = []
    for t in range(n):
        speak = rng.random() < 0.5
        turns.append(MicroTurn(
            user_audio=rng.integers(0, 16, (4, 80), dtype=np.uint8),
            video=(rng.integers(0, 256, (int(rng.integers(1, 4)), 2, 40, 40, 3), dtype=np.uint8)
                   if video_every and t % video_every == 0 else None),
            typed=str(rng.choice(WORDS)) if rng.random() < 0.1 else "",
            background=str(rng.choice(WORDS)) if rng.random() < 0.05 else "",
            model_text=str(rng.choice(WORDS)) if rng.random() < 0.3 else "",
            model_speech=rng.integers(0, 16, (4, 80), dtype=np.uint8) if speak else None,
            control=tuple(rng.choice(["<backchannel>", "<delegate>"], int(rng.random() < 0.1))),
        ))
    return turns


def make_batch(batch_size: int, row_length: int = ROW_LENGTH, max_patches: int = MAX_PATCHES,
               seed: int = 0) -> dict:
    """``batch_size`` packed rows (numpy) of random conversations of 100-200 micro-turns
    (20-40 s: most pieces fill a whole row, as minutes-long real conversations do)."""
    from tml.stream import layout, pack

    rng = np.random.default_rng(seed)
    seqs = []
    while True:
        seqs += [layout(random_micro_turns(rng, int(rng.integers(100, 201)))) for _ in range(4)]
        rows = pack(seqs, row_length, max_patches, align=ALIGN).as_dict()
        # the last row may be partly empty: keep only rows that were closed full
        if rows["tokens"].shape[0] > batch_size:
            return {k: v[:batch_size] for k, v in rows.items()}


def _best(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), times


def bench_config(name: str, repeats: int, batch_size: int | None = None, row_length: int = ROW_LENGTH,
                 modes=MODES, log=print) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tml import kernels
    from tml.model.count import count_params
    from tml.model.loss import losses
    from tml.model.model import InteractionModel

    cfg = load_recipe(name)
    B = batch_size or BATCH.get(name, 1)
    batch_np = make_batch(B, row_length)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    tokens = B * row_length
    real = int((batch_np["segment_ids"] > 0).sum())
    counts = count_params(cfg)
    t = time.perf_counter()
    model = InteractionModel(cfg, rngs=nnx.Rngs(0))
    log(f"[{name}] {counts['total'] / 1e6:.1f}M params ({counts['active'] / 1e6:.1f}M active), batch "
        f"{B} x {row_length} ({real / tokens:.0%} real tokens, "
        f"{int((batch_np['patch_index'] >= 0).sum())} video patches), init {time.perf_counter() - t:.1f}s")

    def loss_fn(m, b):
        return losses(m(b), b)[0]

    result = {"config": name, "batch_size": B, "row_length": row_length, "tokens": tokens,
              "real_tokens": real, "params_total": counts["total"], "params_active": counts["active"],
              "modes": {}}
    for mode in modes:
        fwd = nnx.jit(lambda m, b: m(b))
        step = nnx.jit(nnx.value_and_grad(loss_fn))
        with kernels.kernel_mode(mode):
            def run_fwd(fwd=fwd):
                return jax.block_until_ready(fwd(model, batch).text_logits)

            def run_step(step=step):
                return jax.block_until_ready(step(model, batch))

            entry = {}
            for label, run in (("forward", run_fwd), ("fwd_bwd", run_step)):
                t = time.perf_counter()
                run()
                compile_s = time.perf_counter() - t
                best, times = _best(run, repeats)
                entry[label] = {"best_s": best, "times_s": times, "compile_s": compile_s,
                                "tokens_per_s": tokens / best}
                log(f"[{name}] {mode:<15} {label:<8} best {best * 1e3:9.1f} ms "
                    f"({tokens / best:9.0f} tok/s; first call {compile_s:.1f}s)")
        result["modes"][mode] = entry
    if set(MODES) <= set(modes):
        result["ratio_batch_invariant_over_standard"] = {
            k: result["modes"]["batch_invariant"][k]["best_s"] / result["modes"]["standard"][k]["best_s"]
            for k in ("forward", "fwd_bwd")}
    return result


def format_table(results: list[dict]) -> str:
    head = (f"{'config':<8}{'batch':>10}{'step':>9}{'batch_inv ms':>14}{'standard ms':>13}{'ratio':>7}"
            f"{'bi tok/s':>11}{'std tok/s':>11}")
    lines = [head, "-" * len(head)]
    for r in results:
        for step in ("forward", "fwd_bwd"):
            bi = r["modes"].get("batch_invariant", {}).get(step)
            sd = r["modes"].get("standard", {}).get(step)
            def fmt_ms(e):
                return f"{e['best_s'] * 1e3:.1f}" if e else "-"

            def fmt_tps(e):
                return f"{e['tokens_per_s']:.0f}" if e else "-"

            ratio = f"{bi['best_s'] / sd['best_s']:.2f}" if bi and sd else "-"
            lines.append(f"{r['config']:<8}{r['batch_size']:>4} x {r['row_length']:<4}{step:>9}"
                         f"{fmt_ms(bi):>14}{fmt_ms(sd):>13}{ratio:>7}{fmt_tps(bi):>11}{fmt_tps(sd):>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tml.model.bench", description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS),
                   help="model recipes (names under recipes/model/ or YAML paths); default: tiny small")
    p.add_argument("--out", default="bench_results/model.json", help="JSON output path")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per step (best is reported)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: tiny 4, small 2)")
    p.add_argument("--row-length", type=int, default=ROW_LENGTH)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = p.parse_args(argv)

    env = environment()
    results = [bench_config(c, args.repeats, args.batch_size, args.row_length, args.modes)
               for c in args.configs]
    table = format_table(results)
    print()
    print(table)
    out = {"environment": env, "repeats": args.repeats, "results": results, "table": table.splitlines()}
    write_report(args.out, out)
    return out


if __name__ == "__main__":
    main()
