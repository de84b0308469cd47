"""What every benchmark (``tml data bench``, ``python -m tml.{kernels,model,train}.bench``)
records beside its figures, and how it writes them: the machine and library versions
(:func:`environment`; figures on a loaded 2-core CPU mean little without the load
average) and one atomic JSON file (:func:`write_report`)."""

from __future__ import annotations

import os
import platform
import time
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
