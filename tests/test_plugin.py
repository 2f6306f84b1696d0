"""The pytest plugin, as a new project sees it: a project of its own (made
by pytester) with pwriter installed and nothing else of ours, in trio_mode
and with explicit ``@pytest.mark.trio``."""

from __future__ import annotations

import pytest

FIXTURES = ["pwriter_memory_backend", "pwriter_fault_backend", "pwriter_fake_fs", "pwriter_open_writer"]

USER_TESTS = '''
import errno
import os

import pytest
import trio

from pwriter.errors import WriteError
from pwriter.faces.testing import assert_same_events, read_events


MARK
async def test_x(pwriter_open_writer, autojump_clock):
    async with pwriter_open_writer() as writer:
        async with writer.producer() as producer:
            await producer.send_line(b'{"name":"read"}')
    assert read_events(writer.outputs[0]) == [b'{"name":"read"}']


MARK
async def test_a_ten_second_flush_delay_takes_no_time(pwriter_open_writer, pwriter_memory_backend, autojump_clock):
    async with pwriter_open_writer(backend=pwriter_memory_backend, max_delay=10) as writer:
        async with writer.producer() as producer:
            await producer.send_line(b'{"name":"late"}')
            start = trio.current_time()
            await trio.sleep(60)
            written = [w for w in pwriter_memory_backend.writes if b"late" in w.data]
            assert len(written) == 1 and 10 <= written[0].time - start <= 30
    assert pwriter_memory_backend.events() == [b'{"name":"late"}']


MARK
@pytest.mark.pwriter_fault(fail_at=2, error=errno.ENOSPC, on="write")
async def test_a_full_disk_publishes_nothing(pwriter_open_writer, pwriter_fault_backend, tmp_path):
    with pytest.raises(WriteError) as raised:
        async with pwriter_open_writer(backend=pwriter_fault_backend, stripe_size="64KiB") as writer:
            async with writer.producer() as producer:
                for n in range(20_000):
                    await producer.send_line(b'{"n":%d}' % n)
    assert raised.value.errno == errno.ENOSPC and pwriter_fault_backend.failed
    assert os.listdir(tmp_path) == []


MARK
@pytest.mark.pwriter_fault(delay=5.0, inner="memory")
async def test_slow_disk_on_the_virtual_clock(pwriter_open_writer, pwriter_fault_backend, autojump_clock):
    lines = [b'{"n":%d}' % n for n in range(1000)]
    async with pwriter_open_writer(backend=pwriter_fault_backend, layout="sharded", lanes=2) as writer:
        async with writer.producer() as producer:
            await producer.send_lines(lines)
    assert trio.current_time() >= 5.0
    assert_same_events(pwriter_fault_backend.inner.events(), lines)


MARK
async def test_sizing_on_a_fake_lustre(pwriter_fake_fs, pwriter_open_writer):
    info = pwriter_fake_fs("lustre", stripe_size="1MiB", stripe_count=4)
    async with pwriter_open_writer() as writer:
        assert (writer.sizing.layout, writer.sizing.stripe_size) == ("padded-striped", 1 << 20)
        assert writer.sizing.lanes <= 4
        async with writer.producer() as producer:
            await producer.send_line(b'{"a":1}')
    assert info.kind == "lustre" and writer.statistics().fs_kind == "lustre"


MARK
async def test_the_fixture_takes_settings_as_open_writer_does(pwriter_open_writer):
    from pwriter.plan.settings import load_settings

    with pytest.raises(TypeError, match="'stripe_sise'"):
        async with pwriter_open_writer(stripe_sise="64KiB"):
            pass
    given = load_settings(fsync=False, layout="sharded", lanes=2)
    async with pwriter_open_writer("given.pfw", settings=given, max_delay=10, producers=2) as writer:
        assert (writer.sizing.layout, writer.sizing.lanes, writer.settings.max_delay) == ("sharded", 2, 10)
        async with writer.producer() as producer:
            await producer.send_line(b'{"a":1}')
    assert read_events(writer.manifest) == [b'{"a":1}']


def test_sizing_on_a_fake_nfs_without_trio(pwriter_fake_fs, tmp_path):
    from pwriter.plan.settings import load_settings
    from pwriter.service.writer import plan

    pwriter_fake_fs("nfs")
    fs, sizing = plan(str(tmp_path / "x.pfw"), load_settings())
    assert fs.kind == "nfs" and sizing.layout == "sharded"
'''


@pytest.mark.parametrize("style", ["trio_mode", "marked"])
def test_a_new_project_uses_the_fixtures(pytester: pytest.Pytester, style: str) -> None:
    if style == "trio_mode":
        pytester.makeini("[pytest]\ntrio_mode = true\nfilterwarnings = error\n")
        pytester.makepyfile(test_user=USER_TESTS.replace("MARK\n", ""))
    else:
        pytester.makeini("[pytest]\nfilterwarnings = error\n")
        pytester.makepyfile(test_user=USER_TESTS.replace("MARK\n", "@pytest.mark.trio\n"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=7)


def test_fixtures_are_listed_with_a_description(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    text = result.stdout.str()
    for name in FIXTURES:
        assert f"{name} -- " in text, name
        description = text.split(f"{name} -- ", 1)[1].splitlines()[1].strip()
        assert description.startswith(("A pwriter", "Pretend", "Open a pwriter")), (name, description)


def test_an_unknown_inner_backend_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bad='''
import pytest

@pytest.mark.pwriter_fault(inner="tape")
def test_bad(pwriter_fault_backend):
    pass
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert "inner must be 'threads' or 'memory'" in result.stdout.str() + result.stderr.str()


def test_the_fault_marker_takes_errno_names_and_refuses_what_it_does_not_know(pytester: pytest.Pytester) -> None:
    """Issue 19, case 24: ``error="ENOSPC"`` raised a TypeError inside the backend, and ``on="wirte"`` was
    silently ignored (no operation ever failed)."""
    pytester.makeini("[pytest]\ntrio_mode = true\nfilterwarnings = error\n")
    pytester.makepyfile(test_marks='''
import errno
import os

import pytest

from pwriter.errors import WriteError
from pwriter.faces.testing import FaultBackend, MemoryBackend


@pytest.mark.pwriter_fault(fail_at=2, error="ENOSPC", on="write")
async def test_an_errno_by_name(pwriter_open_writer, pwriter_fault_backend, tmp_path):
    with pytest.raises(WriteError) as raised:
        async with pwriter_open_writer(backend=pwriter_fault_backend) as writer:
            async with writer.producer() as producer:
                await producer.send_line(b'{"a":1}')
    assert raised.value.errno == errno.ENOSPC and "No space left" in str(raised.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.pwriter_fault(fail_at=1, on="wirte")
def test_a_typo_in_on(pwriter_fault_backend):
    pass


def test_what_the_backend_refuses():
    for wrong in ({"on": "wirte"}, {"error": "ENOSPACE"}, {"error": "path"}, {"error": 0}, {"error": True}):
        with pytest.raises(ValueError):
            FaultBackend(MemoryBackend(), **wrong)
    backend = FaultBackend(MemoryBackend(), error="EIO")
    assert backend.error == errno.EIO
    with pytest.raises(ValueError, match="'fsnyc'"):
        backend.on = "fsnyc"
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    assert "on='wirte'" in result.stdout.str()
