"""A real PostgreSQL server on loopback for the tests (Debian's `postgresql` package).

`.ci/run` installs the package; the fixture creates a throw-away cluster in a temporary
directory, starts it on a free port (loopback only, Unix socket in the same directory) and
removes it at the end of the session. Under CI a missing PostgreSQL fails the tests; on a
developer machine without it they are skipped with the command that installs it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import psycopg
import pytest

from benchmarks.server_process import free_port

USER = "steerserve"
INSTALL_HINT = "apt-get install -y postgresql"


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _version(path: str) -> tuple[int, ...]:
    part = path.split("/")[4]
    return tuple(int(x) for x in part.split(".") if x.isdigit())


def _as_server_user() -> list[str]:
    """PostgreSQL refuses to run as root: drop to the package's `postgres` user."""
    if os.geteuid() != 0:
        return []
    pwd.getpwnam("postgres")  # KeyError: the package that creates the user is missing
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    bindir = _bindir()
    if bindir is None:
        message = f"PostgreSQL is not installed ({INSTALL_HINT})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    run_as = _as_server_user()
    root = tempfile.mkdtemp(prefix="steerserve-pg-")  # not under pytest's 0700 tmp dirs
    data = os.path.join(root, "data")
    if run_as:
        shutil.chown(root, "postgres", "postgres")
    subprocess.run(
        [
            *run_as,
            f"{bindir}/initdb",
            "-D",
            data,
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    port = free_port()
    log = open(os.path.join(root, "server.log"), "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            *run_as,
            f"{bindir}/postgres",
            "-D",
            data,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            root,
            "-c",
            "fsync=off",
            "-c",
            "max_connections=100",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    dsn = f"host=127.0.0.1 port={port} user={USER} dbname=postgres"
    try:
        deadline = time.time() + 60
        while True:
            try:
                psycopg.connect(dsn, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.time() > deadline:
                    with open(os.path.join(root, "server.log")) as f:
                        pytest.fail(f"PostgreSQL did not start:\n{f.read()[-3000:]}")
                time.sleep(0.2)
        yield f"postgresql+psycopg://{USER}@127.0.0.1:{port}/postgres"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)
