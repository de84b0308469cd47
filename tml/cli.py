"""The ``tml`` command: ``tml <command> [hydra overrides ...]`` (``tml train``,
``tml data build`` ...).

Each command composes the Hydra recipe tree in ``recipes/`` (validated against the
structured configs of :mod:`tml.config`) and runs one capability. Overrides use Hydra
syntax: ``tml data build data.n_conversations=64 data.out_dir=/tmp/corpus``.
"""

from __future__ import annotations

import json
import sys
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from tml.config import TmlConfig, register_configs


def _to_dataclass(cfg: DictConfig) -> TmlConfig:
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def data_build(cfg: DictConfig) -> None:
    """Build the corpus (synthetic by default, or data=moshi) into shards and summarise it."""
    from tml.data_pipelines.build import build_corpus
    from tml.data_pipelines.shards import format_summary

    c = _to_dataclass(cfg).data
    result = build_corpus(c)
    print(format_summary(result.manifest))
    mt = result.manifest["micro_turns"]
    print(f"shards written: {result.written}, already finished: {result.skipped}, "
          f"time: {result.seconds:.1f}s" + (f" ({mt / result.seconds:.0f} micro-turns/s)"
                                            if result.written and result.skipped == 0 else ""))
    print(f"manifest: {c.out_dir}/manifest.json  rejects: {c.out_dir}/rejects.jsonl")


def data_summary(cfg: DictConfig) -> None:
    """Print the summary of an existing corpus (``data.out_dir``)."""
    import json
    from pathlib import Path

    from tml.data_pipelines.shards import MANIFEST, format_summary

    path = Path(cfg.data.out_dir) / MANIFEST
    if not path.exists():
        sys.exit(f"no corpus at {cfg.data.out_dir}: run `tml data build` first")
    print(format_summary(json.loads(path.read_text())))


def data_bench(cfg: DictConfig) -> None:
    """Benchmark corpus build and loader throughput (1 and 2 workers); writes JSON."""
    from tml.data_pipelines.bench import run_bench

    run_bench(_to_dataclass(cfg))


def model_params(cfg: DictConfig) -> None:
    """Print total and active (per token) parameter counts of every model recipe."""
    from pathlib import Path

    from hydra.core.config_store import ConfigStore  # noqa: F401  (schemas registered)
    from tml.model.config import ModelConfig
    from tml.model.count import count_params, format_count

    import tml.recipes

    rows = []
    for path in sorted((Path(tml.recipes.__file__).parent / "model").glob("*.yaml")):
        raw = OmegaConf.load(path)
        raw.pop("defaults", None)
        mc = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))
        c = count_params(mc)
        rows.append((path.stem, c))
    print(f"{'model':<24}{'total':>12}{'active/token':>14}{'routed experts':>16}")
    for name, c in rows:
        print(f"{name:<24}{format_count(c['total']):>12}{format_count(c['active']):>14}"
              f"{format_count(c['routed_expert']):>16}")


def train(cfg: DictConfig) -> None:
    """Pretrain the co-trained model (builds the corpus first when missing)."""
    from tml.train.trainer import train as run

    summary = run(_to_dataclass(cfg))
    print(json.dumps(summary, indent=1))


def eval_(cfg: DictConfig) -> None:
    """Score a policy on held-out scenarios, or a Full-Duplex-Bench folder (eval=fdb); writes eval.json."""
    from tml.eval.run import main

    main(_to_dataclass(cfg))


def divergence(cfg: DictConfig) -> None:
    """Trainer-sampler drift of held-out sessions in both kernel modes; writes divergence.json."""
    from tml.sampler.divergence_run import run

    run(_to_dataclass(cfg))


def serve(cfg: DictConfig) -> None:
    """Talk to a checkpoint: websocket streaming sessions and a browser page (prints the URL)."""
    from tml.serve.app import main

    main(_to_dataclass(cfg))


def sample(cfg: DictConfig) -> None:
    """Stream your own audio file through a model: stereo wav, transcript and timeline plot."""
    from tml.sampler.sample_cli import run

    run(_to_dataclass(cfg))


def rl(cfg: DictConfig) -> None:
    """On-policy RL (GRPO/PPO) in the aligned engine, eval-scorer rewards, drift metrics every step."""
    from tml.rl.loop import run

    try:
        run(_to_dataclass(cfg))
    except (FileNotFoundError, ValueError) as e:  # each names what to pass instead
        raise SystemExit(f"tml rl: {e}") from None


COMMANDS: dict[str, Callable[[DictConfig], None]] = {
    "train": train,
    "data build": data_build,
    "data summary": data_summary,
    "data bench": data_bench,
    "model params": model_params,
    "eval": eval_,
    "serve": serve,
    "divergence": divergence,
    "sample": sample,
    "rl": rl,
}


def usage() -> str:
    lines = ["usage: tml <command> [key=value ...]", "", "commands:"]
    for name, fn in COMMANDS.items():
        lines.append(f"  tml {name:<14} {fn.__doc__.splitlines()[0]}")
    lines += ["", "Overrides are Hydra syntax; `tml <group> <command> --cfg job` prints the config."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import hydra

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    key = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else argv[0]
    if key not in COMMANDS:
        print(f"tml: unknown command {' '.join(argv[:2])!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    n_words = len(key.split())
    register_configs()
    sys.argv = ["tml-" + key.replace(" ", "-"), *argv[n_words:]]
    hydra.main(config_path="pkg://tml.recipes", config_name="config", version_base="1.3")(
        COMMANDS[key]
    )()


if __name__ == "__main__":
    main()
