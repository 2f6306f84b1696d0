"""A visible API: dir() and help() list the public names; every setting
says what it means, in `pwriter info` and `pwriter merge --help`."""

from __future__ import annotations

import json
import pydoc
import subprocess
import sys
import textwrap

import pytest

import pwriter
from pwriter.plan.settings import Settings

from helpers import run_cli


def test_dir_and_help_show_the_api() -> None:
    names = dir(pwriter)
    for name in pwriter.__all__:
        assert name in names
        assert getattr(pwriter, name) is not None
    assert "Any" not in names and "TYPE_CHECKING" not in names
    text = pydoc.render_doc(pwriter, renderer=pydoc.plaintext)
    for name in ("open_writer", "open_writer_sync", "merge_sync", "class Writer", "class SyncProducer"):
        assert name in text


def test_every_setting_is_described_in_info_and_merge_help(tmp_path) -> None:
    assert all(field.description for field in Settings.model_fields.values())
    helped = run_cli("merge", "--help")
    info = run_cli("info", str(tmp_path))
    report = json.loads(run_cli("info", str(tmp_path), "--json").stdout)
    for name, field in Settings.model_fields.items():
        variable = "PWRITER_" + name.upper()
        assert variable in helped.stdout and variable in info.stdout
        assert report["settings"][variable]["description"] == field.description


@pytest.mark.parametrize("first", [
    "pwriter.open_writer_sync",
    "pwriter.merge_sync",
    "pwriter.collect_inputs",
    "import pwriter.service.merge",
    "import pwriter.faces.sync, pwriter.faces.cli, pwriter.faces.mpi",
    "from pwriter.service.merge import MergeResult",
    "pwriter.merge",
])
def test_pwriter_merge_is_the_function_whatever_is_imported_first(first: str) -> None:
    """Issue 19, case 20: importing the submodule that defines merge (as open_writer_sync, merge_sync and
    collect_inputs do) set the package's attribute ``merge`` to the module: ``pwriter.merge(...)`` raised
    "'module' object is not callable".  A fresh interpreter per import order."""
    script = textwrap.dedent(f"""
        import inspect, sys
        import pwriter
        {first}
        from pwriter import merge
        assert pwriter.merge is merge and inspect.iscoroutinefunction(merge), pwriter.merge
        assert merge.__module__ == "pwriter.service.merge" and "pwriter.service.merge" in sys.modules
        assert sys.modules["pwriter.service.merge"].merge is merge
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
