"""``mpiexec -n N pwriter merge``: the same events as one process, in every layout, plain and gzip; failures.

Each run is a real MPI job (the mpich wheel's mpiexec, oversubscribed on
this machine's cores), killed with its whole process group if it outlives
its timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from pwriter.data.output import is_temporary_name, lock_path
from pwriter.faces.corpus import write_corpus
from pwriter.faces.testing import read_events

from helpers import BIN, dftracer_tool, fake_ranks, published, run_cli

pytest.importorskip("mpi4py", reason="the MPI extra is not installed (pip install 'pwriter[mpi]')")
MPIEXEC = shutil.which("mpiexec", path=BIN)
if MPIEXEC is None:  # pragma: no cover
    pytest.skip("mpiexec is not installed (pip install 'pwriter[mpi]')", allow_module_level=True)

LAYOUTS = ["striped", "padded-striped", "sharded"]
JOB_TIMEOUT = 120


def mpi_merge(ranks: int, *args: str, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``mpiexec -n ranks pwriter merge args``; the job is killed whole if it hangs."""
    process = subprocess.Popen([MPIEXEC, "-n", str(ranks), os.path.join(BIN, "pwriter"), "merge", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"the MPI job hung for {timeout} s") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A mixed corpus (plain and gzip, array and NDJSON style) of 13 inputs."""
    directory = tmp_path_factory.mktemp("corpus")
    write_corpus(str(directory), files=13, events_per_file=400, seed=7)
    return str(directory)


@pytest.fixture(scope="module")
def single_process_events(corpus, tmp_path_factory) -> list[bytes]:
    out = tmp_path_factory.mktemp("single") / "merged.pfw"
    done = run_cli("merge", "-d", corpus, "-o", str(out), "--no-fsync")
    assert done.returncode == 0, done.stderr
    return sorted(read_events(out))


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_four_ranks_write_the_events_of_one_process(corpus, single_process_events, tmp_path, layout: str,
                                                    compressed: bool, backend_name: str) -> None:
    out = tmp_path / ("merged.pfw.gz" if compressed else "merged.pfw")
    done = mpi_merge(4, "-d", corpus, "-o", str(out), "--layout", layout, "--backend", backend_name,
                     "--no-fsync", "--json")
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()  # rank 0 alone reports
    report = json.loads(line)
    assert report["ranks"] == 4 and [entry["rank"] for entry in report["per_rank"]] == [0, 1, 2, 3]
    assert report["events"] == len(single_process_events) == sum(entry["events"] for entry in report["per_rank"])
    assert report["layout"] == layout and report["compressed"] == compressed
    assert sorted(read_events(published(out, layout))) == single_process_events
    assert [name for name in os.listdir(tmp_path) if is_temporary_name(name)] == []
    if compressed:  # the member index, gathered from every rank, covers every event once
        index = json.loads((tmp_path / "merged.pfw.gz.members.json").read_text())
        assert sum(member["events"] for member in index["members"]) == len(single_process_events)


def event_count(directory) -> int:
    done = subprocess.run([dftracer_tool("dftracer_event_count"), "-d", str(directory), "--log-level", "off"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gzip_output_of_two_ranks_reads_whole_in_the_field_tool(tmp_path, layout: str) -> None:
    ranks = tmp_path / "ranks"
    fake_ranks(ranks, ranks=8, epochs=1, steps=40)
    expected = event_count(ranks)
    out = tmp_path / "out" / "merged.pfw.gz"
    out.parent.mkdir()
    done = mpi_merge(2, "-d", str(ranks), "-o", str(out), "--layout", layout, "--no-fsync", "--verify")
    assert done.returncode == 0, done.stderr
    for name in os.listdir(out.parent):  # the tool reads every .pfw.gz of a directory: the data files only
        if not name.endswith(".pfw.gz"):
            os.unlink(out.parent / name)
    assert expected > 0 and event_count(out.parent) == expected


def test_exscan_offsets_give_the_same_events(corpus, single_process_events, tmp_path) -> None:
    out = tmp_path / "merged.pfw"
    done = mpi_merge(2, "-d", corpus, "-o", str(out), "--mpi-offsets", "exscan", "--layout", "striped",
                     "--no-fsync", "--verify")
    assert done.returncode == 0, done.stderr
    assert sorted(read_events(out)) == single_process_events


@pytest.mark.parametrize("wrap", ["auto", "array"])
def test_more_ranks_than_inputs(tmp_path, wrap: str) -> None:
    """(auto: NDJSON in, NDJSON out, issue 22; the ranks with nothing to
    write leave the shared file's start alone, header or none.)"""
    source = tmp_path / "only.pfw"
    source.write_bytes(b'{"id":1}\n{"id":2}\n')
    out = tmp_path / "merged.pfw"
    done = mpi_merge(4, str(source), "-o", str(out), "--no-fsync", "--layout", "striped", "--wrap", wrap)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == (b'[\n{"id":1}\n{"id":2}\n]\n' if wrap == "array" else b'{"id":1}\n{"id":2}\n')


@pytest.mark.parametrize("layout", ["striped", "sharded"])  # (sharded: each rank removes the shards it created)
def test_a_bad_input_on_one_rank_fails_the_job_cleanly(corpus, tmp_path, layout: str) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(corpus, inputs)
    (inputs / "zz_cut.pfw").write_bytes(b'{"id":1}\n{"id":2,"na')  # the last input: the last rank's
    out = tmp_path / "out" / "merged.pfw"
    out.parent.mkdir()
    done = mpi_merge(4, "-d", str(inputs), "-o", str(out), "--no-fsync", "--layout", layout)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()  # one error line, from rank 0
    assert line.startswith("pwriter: error: ") and "zz_cut.pfw" in line and "(on rank 3)" in line
    assert done.stdout == ""
    assert os.listdir(out.parent) == []  # no output, no temporary


def test_an_existing_output_is_refused_by_every_rank(corpus, tmp_path) -> None:
    out = tmp_path / "merged.pfw"
    out.write_bytes(b"keep me")
    done = mpi_merge(2, "-d", corpus, "-o", str(out))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "output exists" in line and "--force" in line
    assert out.read_bytes() == b"keep me"


class LiveJob:
    """An MPI merge whose last input, the last rank's, is a FIFO that the test
    feeds: that rank is certainly mid-merge (blocked reading it) while the
    test acts.  Every other input is a copy of the corpus."""

    def __init__(self, corpus: str, tmp_path, ranks: int, *args: str, env: dict[str, str] | None = None) -> None:
        inputs = tmp_path / "in"
        shutil.copytree(corpus, inputs)
        self.fifo = inputs / "zz_live.pfw"
        os.mkfifo(self.fifo)
        self.files = sorted(str(path) for path in inputs.iterdir() if path != self.fifo)  # (-d takes regular files)
        self.out = tmp_path / "out" / "merged.pfw"
        self.out.parent.mkdir()
        self.process = subprocess.Popen(
            [MPIEXEC, "-n", str(ranks), os.path.join(BIN, "pwriter"), "merge", *self.files, str(self.fifo), "-o",
             str(self.out), "--no-fsync", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        self.feed: int | None = None
        while self.feed is None and time.monotonic() < deadline:
            try:
                self.feed = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a rank opens it to read
            except OSError:
                time.sleep(0.05)
        if self.feed is None:
            self.end()
            raise AssertionError("no rank ever read the FIFO")
        os.write(self.feed, b'{"id":1,"name":"live"}\n' * 100)

    def rank(self, number: int) -> psutil.Process:
        (found,) = [child for child in psutil.Process(self.process.pid).children(recursive=True)
                    if child.environ().get("PMI_RANK") == str(number)]
        return found

    def close_feed(self) -> None:
        if self.feed is not None:
            os.close(self.feed)
            self.feed = None

    def end(self, timeout: float = 60) -> str:
        """Wait for the job (killed whole if it outlives ``timeout``); its stderr."""
        try:
            _, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.communicate()
            raise AssertionError(f"the MPI job hung for {timeout} s") from None
        finally:
            self.close_feed()
        return stderr


def test_a_rank_killed_mid_merge_ends_the_job_with_no_output(corpus, tmp_path) -> None:
    job = LiveJob(corpus, tmp_path, 3)
    job.rank(1).kill()
    job.end()
    assert job.process.returncode != 0
    assert not job.out.exists()
    left = [name for name in os.listdir(job.out.parent) if not is_temporary_name(name)]  # (and the killed lock)
    assert left in ([], [os.path.basename(lock_path(str(job.out)))])
    # What the killed job left is removed by the next merge into the same output.
    done = run_cli("merge", *job.files, "-o", str(job.out), "--no-fsync")
    assert done.returncode == 0, done.stderr
    assert os.listdir(job.out.parent) == ["merged.pfw"]


def test_exscan_where_it_cannot_work_is_refused(corpus, tmp_path) -> None:
    out = tmp_path / "merged.pfw.gz"
    done = mpi_merge(2, "-d", corpus, "-o", str(out), "--mpi-offsets", "exscan")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "--mpi-offsets exscan: only for a striped, plain output" in line
    assert os.listdir(tmp_path) == []


def test_standard_output_is_refused_once(corpus) -> None:
    done = mpi_merge(2, "-d", corpus, "-o", "-")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["pwriter: error: -o -: a merge over MPI ranks writes a file, "
                                                "not a stream"]


def test_sigterm_to_one_rank_ends_every_rank_and_publishes_nothing(corpus, tmp_path) -> None:
    job = LiveJob(corpus, tmp_path, 2)
    job.rank(1).send_signal(signal.SIGTERM)
    time.sleep(0.5)
    job.close_feed()  # the blocked read returns; the rank then sees its cancellation
    stderr = job.end()
    assert job.process.returncode != 0
    assert "pwriter: error: rank 1 was interrupted or terminated" in stderr, stderr
    assert os.listdir(job.out.parent) == []  # rank 0 removed every temporary


def test_a_write_error_on_the_ranks_fails_the_job_cleanly(corpus, tmp_path) -> None:
    out = tmp_path / "out" / "merged.pfw"
    out.parent.mkdir()
    # Files may not grow past 256 KiB (set after MPI_Init, whose shared memory is bigger): the
    # writes past it fail with EFBIG, on whichever ranks make them.
    script = ("import resource, sys\nfrom mpi4py import MPI\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))\n"
              "from pwriter.faces.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    process = subprocess.Popen([MPIEXEC, "-n", "2", os.path.join(BIN, "python"), "-c", script, "merge", "-d", corpus,
                                "-o", str(out), "--no-fsync", "--layout", "striped"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout, stderr = process.communicate(timeout=JOB_TIMEOUT)
    assert process.returncode == 1, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("pwriter: error: ") and "File too large" in line and "(on rank" in line
    assert os.listdir(out.parent) == []


def test_mpi_without_mpi4py_is_a_usage_error(monkeypatch) -> None:
    import sys

    from pwriter.errors import UsageError
    from pwriter.faces.mpi import World

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as where the extra is not installed
    with pytest.raises(UsageError, match=r"mpi4py is not installed \(pip install 'pwriter\[mpi\]'\)"):
        World()


@pytest.mark.parametrize("layout", ["padded-striped", "sharded"])
def test_every_file_gets_its_lustre_layout_on_create(corpus, single_process_events, tmp_path, layout: str) -> None:
    """On (fake) Lustre: rank 0 creates the shared file with its layout (the
    other ranks only open it); each rank creates its own shards with theirs
    (tests/fake_lfs.py logs every lfs call)."""
    here = os.path.dirname(os.path.abspath(__file__))
    bin_dir, state, root = tmp_path / "bin", tmp_path / "lfs-state", tmp_path / "lustre"
    for directory in (bin_dir, state, root):
        directory.mkdir()
    (bin_dir / "lfs").write_text(f"#!{os.path.join(BIN, 'python')}\nimport sys\nsys.path.insert(0, {here!r})\n"
                                 "from fake_lfs import main\nsys.exit(main(sys.argv[1:]))\n")
    (bin_dir / "lfs").chmod(0o755)
    script = ("import os, sys\nimport pwriter.data.detect as detect\nfrom pwriter.data import lustre\n"
              "real = detect.statfs\nlustre._api = False\n"
              f"detect.statfs = lambda path: detect.StatfsResult(0x0BD00BD0, 4096) "
              f"if os.path.abspath(path).startswith({str(root)!r}) else real(path)\n"
              "from pwriter.faces.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = root / "merged.pfw"
    process = subprocess.Popen(
        [MPIEXEC, "-n", "2", os.path.join(BIN, "python"), "-c", script, "merge", "-d", corpus, "-o", str(out),
         "--layout", layout, "--lanes", "2", "--stripe-count", "2" if layout != "sharded" else "auto",
         "--no-fsync"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LFS_STATE": str(state),
             "FAKE_LFS_OSTS": "8"})
    _, stderr = process.communicate(timeout=JOB_TIMEOUT)
    assert process.returncode == 0, stderr
    with open(state / "calls.jsonl") as log:
        setstripes = [call for call in map(json.loads, log) if call[0] == "setstripe"]
    if layout == "sharded":  # 2 ranks x 2 lanes: one stripe each, first OSTs spread over the 8
        assert sorted(call[1:7] for call in setstripes) == [["-c", "1", "-S", str(1 << 20), "-i", str(first)]
                                                            for first in (0, 2, 4, 6)]
    else:  # one shared file, created once
        assert [call[1:5] for call in setstripes] == [["-c", "2", "-S", str(1 << 20)]]
    assert all(is_temporary_name(os.path.basename(call[-1])) for call in setstripes)
    assert sorted(read_events(published(out, layout))) == single_process_events


def test_no_mpi_runs_one_process_whatever_the_environment_says(corpus, single_process_events, tmp_path) -> None:
    out = tmp_path / "merged.pfw"
    done = run_cli("merge", "-d", corpus, "-o", str(out), "--no-fsync", "--no-mpi", "--json",
                   env={"PMI_SIZE": "4", "OMPI_COMM_WORLD_SIZE": "4"})  # as in a pwriter started by a rank
    assert done.returncode == 0, done.stderr
    assert "ranks" not in json.loads(done.stdout)
    assert sorted(read_events(out)) == single_process_events


def test_the_docs_library_example_runs_under_mpiexec(corpus, single_process_events, tmp_path) -> None:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "cluster.md")) as held:
        page = held.read()
    (example,) = page.split("```python\n")[1:]  # the one Python example of docs/cluster.md
    code = example[: example.index("```")]
    script = tmp_path / "example.py"
    script.write_text(f"import glob\npaths = sorted(glob.glob({corpus + '/*'!r}))\n" + code)
    process = subprocess.run([MPIEXEC, "-n", "2", os.path.join(BIN, "python"), str(script)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert process.returncode == 0, process.stderr
    assert process.stdout.split()[0] == str(len(single_process_events))  # printed once, by rank 0
    assert sorted(read_events(tmp_path / "merged.pfw")) == single_process_events


async def test_merge_over_ranks_refuses_an_unknown_offsets_mode(tmp_path) -> None:
    from pwriter.faces.mpi import merge_over_ranks

    with pytest.raises(ValueError, match="offsets='fetch': expected 'counter' or 'exscan'"):
        await merge_over_ranks(None, [], None, str(tmp_path / "m.pfw"), offsets="fetch")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_sigterm_to_the_launcher_ends_every_rank_and_publishes_nothing(corpus, tmp_path) -> None:
    """SIGTERM to mpiexec (a batch system ending the job): the launcher
    passes it on to every rank, which ends as one process does (143), even
    the rank whose reader waits on a silent FIFO; nothing is published and
    no rank is left running.  (The bound only says "did not hang": every
    rank once ran on for as long as the FIFO stayed silent.)"""
    job = LiveJob(corpus, tmp_path, 2)
    ranks = [job.rank(0), job.rank(1)]
    job.process.send_signal(signal.SIGTERM)
    stderr = job.end(timeout=10)
    gone, alive = psutil.wait_procs(ranks, timeout=5)
    assert alive == [], f"ranks still running after SIGTERM: {alive}"
    assert job.process.returncode == 143, stderr
    assert stderr == "pwriter: terminated\n"  # (rank 0 says it, once)
    assert os.listdir(job.out.parent) == []


def test_a_rank_that_hangs_ends_the_job_after_the_mpi_timeout(corpus, tmp_path) -> None:
    """A rank that never finishes its share (here: its FIFO stays silent)
    would keep the others waiting at the next agreement for ever: past
    PWRITER_MPI_TIMEOUT a waiting rank says so, removes the temporary and
    aborts the job; no rank is left running, nothing is published."""
    job = LiveJob(corpus, tmp_path, 2, env={"PWRITER_MPI_TIMEOUT": "1"})
    ranks = [job.rank(0), job.rank(1)]
    stderr = job.end(timeout=30)
    gone, alive = psutil.wait_procs(ranks, timeout=5)
    assert alive == [], f"ranks still running: {alive}"
    assert job.process.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("pwriter: error: ")]
    assert errors, stderr
    assert "rank 0 waited 1 s for the other ranks" in errors[0] and "PWRITER_MPI_TIMEOUT" in errors[0], stderr
    assert os.listdir(job.out.parent) == []


def test_an_output_directory_renamed_mid_merge_gets_the_whole_set(corpus, tmp_path) -> None:
    """Issue 19, case 16: the output directory is renamed while the ranks
    merge into it (sharded: each rank has created its shards there): the set
    is published whole in the directory under its new name, and no
    temporary or lock is left anywhere."""
    job = LiveJob(corpus, tmp_path, 2, "--layout", "sharded", "--lanes", "2")
    moved = tmp_path / "moved"
    os.rename(job.out.parent, moved)
    job.close_feed()
    stderr = job.end()
    assert job.process.returncode == 0, stderr
    manifest = moved / "merged.pfw.shards"
    shards = (moved / "merged.pfw.shards").read_text().split()
    assert sorted(os.listdir(moved)) == sorted([manifest.name, *shards])
    expected = sorted(read_events(path) for path in job.files)
    assert sorted(read_events(manifest)) == sorted([event for events in expected for event in events]
                                                   + [b'{"id":1,"name":"live"}'] * 100)


def test_a_write_error_reported_at_close_fails_the_job(corpus, tmp_path) -> None:
    """Issue 19, case 12: a rank whose shard's close reports EIO (as NFS
    does for a write that failed after it returned), with fsync off: exit 1
    naming the file and the rank, nothing published, nothing left."""
    out = tmp_path / "out" / "merged.pfw"
    out.parent.mkdir()
    script = ("import errno, os, sys\nimport pwriter.data.output\n"
              "class FailingClose:\n"
              "    def __getattr__(self, name):\n"
              "        return self.close if name == 'close' else getattr(os, name)\n"
              "    def close(self, fd):\n"
              "        path = os.readlink(f'/proc/self/fd/{fd}')\n"
              "        os.close(fd)\n"
              "        if '.merged.shard_001.pfw.pwriter-' in path:\n"
              "            raise OSError(errno.EIO, 'Input/output error')\n"
              "pwriter.data.output.os = FailingClose()\n"
              "from pwriter.faces.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    process = subprocess.Popen([MPIEXEC, "-n", "2", os.path.join(BIN, "python"), "-c", script, "merge", "-d", corpus,
                                "-o", str(out), "--no-fsync", "--layout", "sharded", "--lanes", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout, stderr = process.communicate(timeout=JOB_TIMEOUT)
    assert process.returncode == 1, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"pwriter: error: {out.parent / 'merged.shard_001.pfw'}: closing the file failed")
    assert "Input/output error" in line and "(on rank 0)" in line
    assert os.listdir(out.parent) == []
