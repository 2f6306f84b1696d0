from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pwriter.backends import BACKEND_NAMES, available_backends
from pwriter.settings import load_settings

pytest_plugins = ["pytester"]  # tests/test_plugin.py runs pytest in a project of its own

# The dftracer-utils binaries live beside this interpreter in the venv.
BIN = os.path.dirname(sys.executable)


def dftracer_tool(name: str) -> str:
    path = shutil.which(name, path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if path is None:
        pytest.skip(f"{name} is not installed (pip install dftracer-utils)")
    return path


@pytest.fixture(params=BACKEND_NAMES)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Every backend; a backend that cannot run here is skipped with its reason."""
    reason = available_backends()[request.param]
    if reason is not None:
        pytest.skip(f"backend {request.param} unavailable: {reason}")
    return request.param


@pytest.fixture
def settings_for(backend_name: str):
    """Build settings for the backend under test (fsync off unless asked: tests are about content)."""

    def make(**overrides: object):
        overrides.setdefault("fsync", False)
        return load_settings(backend=backend_name, **overrides)

    return make


@pytest.fixture(autouse=True)
def _clean_pwriter_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PWRITER_"):
            monkeypatch.delenv(name)


def run_cli(*args: str, cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``pwriter`` command as a user would."""
    return subprocess.run(
        [os.path.join(BIN, "pwriter"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def expect_failure(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """A command that failed as documented: exit ``code``, nothing on stdout,
    one ``pwriter: error:`` line on stderr holding every one of ``needles``
    (then, for other failures that happened alongside, ``pwriter: also:`` lines)."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) >= 1 and all(line.startswith("pwriter: also: ") for line in lines[1:]), done.stderr
    assert lines[0].startswith("pwriter: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert done.stdout == ""


def published(path: str | os.PathLike[str], layout: str) -> str:
    """The name to read a whole output from (a sharded set: its manifest)."""
    return f"{os.fspath(path)}.shards" if layout == "sharded" else os.fspath(path)


@pytest.fixture(scope="session")
def dftracer_run(tmp_path_factory: pytest.TempPathFactory):
    """Traces written by the real tracer: a launcher and three workers, the
    last of which never finalizes (its trace is cut); built once a session.
    See tests/dftracer_corpus.py.  Skipped when the tracer is not installed."""
    from dftracer_corpus import dftracer_missing, trace_run

    reason = dftracer_missing()
    if reason is not None:
        pytest.skip(reason)
    return trace_run(tmp_path_factory.mktemp("dftracer") / "traces")
