"""The jax/jaxlib pin and the one start-up warning (tml.kernels.version_check)."""

import subprocess
import sys
import warnings

import jax
import jaxlib
import pytest
from tml.kernels import version_check
from tml.kernels.version_check import UnverifiedVersionWarning


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(version_check, "_warned", False)
    return monkeypatch


def test_measured_versions_do_not_warn(fresh):
    fresh.setattr(jax, "__version__", "0.10.2")
    fresh.setattr(jaxlib, "__version__", "0.10.2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert version_check.warn_if_unverified() is False


@pytest.mark.parametrize("jax_v, jaxlib_v", [("0.11.0", "0.10.2"), ("0.10.2", "0.10.3"), ("0.9.0", "0.9.0")])
def test_other_versions_warn_once_naming_both(fresh, jax_v, jaxlib_v):
    fresh.setattr(jax, "__version__", jax_v)
    fresh.setattr(jaxlib, "__version__", jaxlib_v)
    with pytest.warns(UnverifiedVersionWarning) as record:
        assert version_check.warn_if_unverified() is True
    msg = str(record[0].message)
    assert f"jax {jax_v} / jaxlib {jaxlib_v}" in msg and "jax 0.10.2 / jaxlib 0.10.2" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert version_check.warn_if_unverified() is False  # once per process


def test_importing_tml_kernels_warns_on_another_version():
    code = "import jax; jax.__version__ = '0.11.0'; import tml.kernels"
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "UnverifiedVersionWarning" in r.stderr and "jax 0.11.0 / jaxlib 0.10.2" in r.stderr
    code = "import jax, jaxlib; jax.__version__ = jaxlib.__version__ = '0.10.2'; import tml.kernels"
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "UnverifiedVersionWarning" not in r.stderr, r.stderr  # the measured ones: silent
