"""What every benchmark (``tml data bench``, ``python -m tml.{kernels,model,train}.bench``)
records beside its figures, and how it writes them: the machine and library versions
(:func:`environment`; figures on a loaded 2-core CPU mean little without the load
average) and one atomic JSON file (:func:`write_report`); :func:`count_compiles` checks
that a timed loop runs programs compiled beforehand."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tml.files import atomic_write_json


def environment() -> dict[str, Any]:
    """Versions, backend, devices, CPU count, platform, load average and date."""
    import flax
    import jax

    return {"jax": jax.__version__, "flax": flax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write ``report`` as JSON at ``path`` (atomically), say so, and return the path."""
    path = Path(path)
    atomic_write_json(path, report)
    print(f"\nwrote {path}")
    return path


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT


@contextlib.contextmanager
def count_compiles() -> Iterator[list[str]]:
    """``with count_compiles() as compiled:`` — the names of the XLA programs compiled in
    the block (every backend compile JAX reports). A timed loop should leave it empty: a
    compile inside it is time that is not the program's (e.g. a jitted function called
    outside the kernel mode it was compiled under re-traces for the other mode)."""
    import jax

    compiled: list[str] = []

    def listen(event: str, secs: float, **kw) -> None:
        if event == BACKEND_COMPILE:
            compiled.append(str(kw.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
