"""pwriter verify: equal multisets pass, any missing, extra or changed line fails."""

from __future__ import annotations

import gzip
import json

import pytest

import pwriter.plan.traceformat as traceformat
from pwriter.faces.corpus import write_corpus
from pwriter.service.verify import verify

from helpers import run_cli

SCANNERS = ["python"] + (["native"] if traceformat._native is not None else [])


@pytest.fixture
def corpus(tmp_path) -> list[str]:
    return write_corpus(str(tmp_path / "in"), files=8, events_per_file=50, seed=9)


@pytest.mark.parametrize("suffix", [".pfw", ".pfw.gz"])
@pytest.mark.parametrize("layout", ["striped", "padded-striped", "sharded"])
def test_merge_verify_passes(corpus, tmp_path, backend_name: str, layout: str, suffix: str) -> None:
    out = tmp_path / f"merged{suffix}"
    done = run_cli("merge", *corpus, "-o", str(out), "--layout", layout, "--backend", backend_name,
                   "--stripe-size", "64KiB", "--verify")
    assert done.returncode == 0, done.stderr
    assert "verified: the output holds exactly the 400 event lines of the inputs" in done.stdout
    with_json = run_cli("merge", *corpus, "-o", str(out), "--force", "--layout", layout, "--backend",
                        backend_name, "--verify", "--json")
    assert with_json.returncode == 0, with_json.stderr
    report = json.loads(with_json.stdout)  # one JSON object, verification included
    assert report["verification"]["verified"] is True and report["events"] == 400
    again = run_cli("verify", str(out), *corpus, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["verified"] is True


@pytest.mark.parametrize("name", SCANNERS)
@pytest.mark.parametrize("damage", ["missing", "extra", "changed", "duplicated"])
def test_verify_finds_every_difference(corpus, tmp_path, monkeypatch: pytest.MonkeyPatch, name: str,
                                       damage: str) -> None:
    if name == "python":
        monkeypatch.setattr(traceformat, "_native", None)
    lines = [b"["] + [line for path in corpus for line in _events(path)] + [b"]"]
    victim = lines[17]
    if damage == "missing":
        del lines[17]
    elif damage == "extra":
        lines.insert(5, b'{"name":"intruder"}')
    elif damage == "changed":
        lines[17] = victim.replace(b'"name"', b'"nAme"')
    else:
        lines.insert(9, victim)
    out = tmp_path / "bad.pfw.gz"
    out.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    result = verify(str(out), corpus)
    assert not result.match
    expected = {"missing": (1, 0), "extra": (0, 1), "changed": (1, 1), "duplicated": (0, 1)}[damage]
    assert (result.missing, result.extra) == expected
    if damage in ("missing", "changed"):
        assert result.missing_examples == (victim,)
    if damage == "duplicated":
        assert result.extra_examples == (victim,)


def test_verify_command_exit_codes(corpus, tmp_path) -> None:
    out = tmp_path / "m.pfw"
    assert run_cli("merge", *corpus, "-o", str(out)).returncode == 0
    done = run_cli("verify", str(out), *corpus[:-1])
    assert done.returncode == 1
    assert done.stderr.startswith(f"pwriter: error: {out}: does not match its inputs")
    assert len(done.stderr.strip().splitlines()) == 1
    missing = run_cli("verify", str(tmp_path / "nothing.pfw"), *corpus)
    assert missing.returncode == 2 and "no such output" in missing.stderr


def _events(path: str) -> list[bytes]:
    from pwriter.faces.testing import read_events

    return read_events(path)
