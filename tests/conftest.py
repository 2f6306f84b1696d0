from __future__ import annotations

import os

import pytest

from pwriter.data.backends import BACKEND_NAMES, available_backends
from pwriter.plan.settings import load_settings

pytest_plugins = ["pytester"]  # tests/test_plugin.py runs pytest in a project of its own


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
