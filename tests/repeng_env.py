"""A separate, cached virtualenv for the `repeng` interoperability test.

repeng 0.4.0 pins numpy<2 and uses `np.float_` (removed in numpy 2), and wants transformers 4,
so it cannot be installed next to steerserve (numpy 2, transformers 5). Its side of the test
(`repeng_side.py`) therefore runs in a venv of its own, built here once and reused by later
pytest runs and by concurrent pytest processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# Exact pins, so that a venv built next month computes the same vectors as the one built
# today. torch must be named explicitly: left to the resolver, transformers would pull the
# newest torch, which on PyPI is a multi-GB CUDA build. This machine's pip configuration
# (find-links) supplies the 2.13.0 CPU wheel. scikit-learn is pinned because repeng's
# directions come from its PCA (solver choice and sign convention live there); gguf because
# it writes the exported file.
REPENG_REQUIREMENTS: tuple[str, ...] = (
    "torch==2.13.0",
    "numpy==1.26.4",
    "transformers==4.57.6",
    "tokenizers==0.22.2",
    "scikit-learn==1.9.1",
    "gguf==0.19.0",
    "repeng==0.4.0",
)

REPENG_SIDE = Path(__file__).with_name("repeng_side.py")
VENV_ENV_VAR = "STEERSERVE_REPENG_VENV"
# Written last, only after pip succeeded: a venv without it (pip killed, disk full, timeout)
# is deleted and rebuilt rather than trusted.
_MARKER = "steerserve-repeng-ready.txt"
_PIP_TIMEOUT = 1800


def _marker_text() -> str:
    return "\n".join(REPENG_REQUIREMENTS) + "\n"


def _base_python() -> Path:
    """The real CPython behind the running interpreter (never a venv's python symlink).

    A venv created from another venv's `python` would point its `home` at that venv's bin
    directory and break when the outer venv is rebuilt; so go back to the base install.
    """
    candidates = [getattr(sys, "_base_executable", None)]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates.append(str(Path(sys.base_prefix) / "bin" / version))
    own_venv = Path(sys.prefix).resolve() if sys.prefix != sys.base_prefix else None
    for cand in candidates:
        if not cand:
            continue
        real = Path(cand).resolve()
        inside_venv = own_venv is not None and real.is_relative_to(own_venv)
        if real.is_file() and os.access(real, os.X_OK) and not inside_venv:
            return real
    raise RuntimeError(f"no base CPython found for the repeng venv (tried {candidates})")


def _default_venv_dir() -> Path:
    # The base interpreter's version is part of the key: a venv is bound to its interpreter.
    key = _marker_text() + sys.version
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "steerserve" / f"repeng-venv-{digest}"


def _venv_dir() -> Path:
    override = os.environ.get(VENV_ENV_VAR)
    return Path(override).expanduser() if override else _default_venv_dir()


def _is_ready(venv: Path) -> bool:
    marker = venv / _MARKER
    python = venv / "bin" / "python"
    return marker.is_file() and marker.read_text() == _marker_text() and python.exists()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock: a second pytest process waits instead of building too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_checked(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def repeng_python() -> Path:
    """Path of the repeng venv's python, building the venv first if needed (cached)."""
    venv = _venv_dir()
    python = venv / "bin" / "python"
    if _is_ready(venv):  # fast path: no lock once built
        return python
    with _locked(venv.with_name(venv.name + ".lock")):
        if _is_ready(venv):  # another process built it while we waited
            return python
        if venv.exists():  # half-built (or built with other pins): start from scratch
            # Guard against $STEERSERVE_REPENG_VENV naming a directory that is not a venv.
            if not (venv / "pyvenv.cfg").exists() and any(venv.iterdir()):
                raise RuntimeError(f"{venv} exists and is not a venv; refusing to delete it")
            shutil.rmtree(venv)
        _run_checked([str(_base_python()), "-m", "venv", str(venv)], "creating the repeng venv")
        _run_checked(
            [str(python), "-m", "pip", "install", "--no-input", *REPENG_REQUIREMENTS],
            "installing repeng's requirements",
        )
        (venv / _MARKER).write_text(_marker_text())
    return python


def run_repeng(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `repeng_side.py ARGS` in the repeng venv; raise with its stderr if it fails."""
    python = repeng_python()
    # Nothing from our environment may leak in: PYTHONPATH could put steerserve (or our venv's
    # site-packages) on the path, so use isolated mode (-I), which also keeps the user site
    # out. Hub access is switched off: there is no network, and the model is a local dir.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(python), "-I", str(REPENG_SIDE), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"repeng_side.py failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc
