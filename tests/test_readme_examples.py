"""Every Python example of the README's "Using pwriter in a pipeline" runs,
as a user would paste it, and writes its 8,000 events exactly once."""

from __future__ import annotations

import collections
import os
import pathlib
import re
import subprocess
import sys

import pytest

from pwriter.faces.testing import read_events

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def pipeline_examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Using pwriter in a pipeline", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_section_has_the_examples_it_promises() -> None:
    examples = pipeline_examples()
    assert len(examples) == 5
    assert [name for example in examples for name in re.findall(r'"(\w+\.pfw)"', example)] == [
        "merged.pfw", "threads.pfw", "asyncio.pfw", "pool.pfw", "dask.pfw"]


@pytest.mark.parametrize("index", range(5))
def test_readme_pipeline_example_runs(tmp_path: pathlib.Path, index: int) -> None:
    example = pipeline_examples()[index]
    output = re.findall(r'"(\w+\.pfw)"', example)[0]
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PWRITER_FSYNC": "0"})
    assert done.returncode == 0, done.stderr
    events = read_events(str(tmp_path / output))
    assert len(events) == 8000 and len(set(events)) == 8000
    steps: dict[bytes, list[int]] = collections.defaultdict(list)  # each rank's lines keep their order
    for event in events:
        pid = re.search(rb'"pid":(\d+)', event)
        step = re.search(rb'"step":(\d+)', event)
        assert pid and step
        steps[pid.group(1)].append(int(step.group(1)))
    assert all(found == sorted(found) for found in steps.values())
    assert sorted(os.listdir(tmp_path)) == [output]
