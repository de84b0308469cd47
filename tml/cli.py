"""The ``tml`` command: ``tml <group> <command> [hydra overrides ...]``.

Each command composes the Hydra recipe tree in ``recipes/`` (validated against the
structured configs of :mod:`tml.config`) and runs one capability. Overrides use Hydra
syntax: ``tml data build data.n_conversations=64 data.out_dir=/tmp/corpus``.
"""

from __future__ import annotations

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


COMMANDS: dict[tuple[str, str], Callable[[DictConfig], None]] = {
    ("data", "build"): data_build,
    ("data", "summary"): data_summary,
    ("data", "bench"): data_bench,
}


def usage() -> str:
    lines = ["usage: tml <group> <command> [key=value ...]", "", "commands:"]
    for (group, cmd), fn in COMMANDS.items():
        lines.append(f"  tml {group} {cmd:<10} {fn.__doc__.splitlines()[0]}")
    lines += ["", "Overrides are Hydra syntax; `tml <group> <command> --cfg job` prints the config."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import hydra

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    key = (argv[0], argv[1])
    if key not in COMMANDS:
        print(f"tml: unknown command {' '.join(key)!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    register_configs()
    sys.argv = [f"tml-{argv[0]}-{argv[1]}", *argv[2:]]
    hydra.main(config_path="pkg://tml.recipes", config_name="config", version_base="1.3")(
        COMMANDS[key]
    )()


if __name__ == "__main__":
    main()
