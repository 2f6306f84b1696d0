"""A visible API: dir() and help() list the public names; every setting
says what it means, in `pwriter info` and `pwriter merge --help`."""

from __future__ import annotations

import json
import pydoc

import pwriter
from pwriter.settings import Settings

from conftest import run_cli


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
