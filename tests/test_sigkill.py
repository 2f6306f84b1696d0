"""SIGKILL at random moments of a merge: afterwards the target is absent (or
the previous file, when --force replaces one) or complete and verified, and
the temporaries left behind are recognisable and removed by the next merge.

CI runs 20 kills on a corpus of about 40 MiB.  The full-size trial (1 GiB,
as in the issue) is the same test with two variables:

    PWRITER_KILL_TRIAL_MIB=1024 PWRITER_KILL_TRIALS=20 \\
        .venv/bin/python -m pytest tests/test_sigkill.py -s
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import time

from pwriter.data.backends import available_backends
from pwriter.data.output import is_temporary_name, lock_path
from pwriter.faces.corpus import write_corpus
from pwriter.faces.testing import read_text
from pwriter.service.verify import verify

from helpers import BIN

MIB = int(os.environ.get("PWRITER_KILL_TRIAL_MIB", "40"))
TRIALS = int(os.environ.get("PWRITER_KILL_TRIALS", "20"))
EVENTS_PER_FILE = 5000  # about 1.1 MiB of text per file


def merge_command(inputs: str, target: str, backend: str) -> list[str]:
    return [os.path.join(BIN, "pwriter"), "merge", "-d", inputs, "-o", target, "--force", "--backend", backend]


def complete(target: str, inputs: list[str]) -> bool:
    text = read_text(target)
    return text.startswith(b"[\n") and text.endswith(b"]\n") and verify(target, inputs).match


def test_sigkill_at_random_moments(tmp_path) -> None:
    corpus = tmp_path / "in"
    inputs = write_corpus(str(corpus), files=max(2, MIB * 10 // 11), events_per_file=EVENTS_PER_FILE, seed=11)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = str(out_dir / "merged.pfw")
    previous = b'[\n{"id":0,"name":"the previous merge"}\n]\n'
    backends = [name for name, reason in available_backends().items() if reason is None]

    started = time.monotonic()
    subprocess.run(merge_command(str(corpus), target, backends[0]), check=True, capture_output=True)
    duration = time.monotonic() - started
    assert complete(target, inputs)

    rng = random.Random(20261123)
    outcomes: collections.Counter[str] = collections.Counter()
    for trial in range(TRIALS):
        backend = backends[trial % len(backends)]
        had_previous = trial // len(backends) % 2 == 0
        if os.path.exists(target):
            os.unlink(target)
        if had_previous:
            with open(target, "wb") as handle:
                handle.write(previous)
        process = subprocess.Popen(merge_command(str(corpus), target, backend), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        # The first kill lands at once, the last after the merge is surely done, the others anywhere:
        # every kind of outcome is met, and checked below.
        time.sleep(0.0 if trial == 0 else 3 * duration if trial == TRIALS - 1 else rng.uniform(0.0, 1.2 * duration))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if not os.path.exists(target):
            assert not had_previous, f"trial {trial}: the previous output vanished"
            outcomes["absent"] += 1
        elif had_previous and read_text(target) == previous:
            outcomes["previous file kept"] += 1
        else:
            assert complete(target, inputs), f"trial {trial}: a published output is incomplete"
            outcomes["complete"] += 1
        # (the killed run's lock too: the next run takes it over)
        left = [name for name in os.listdir(out_dir) if name not in ("merged.pfw", os.path.basename(lock_path(target)))]
        assert all(is_temporary_name(name) for name in left), left
        outcomes["trials that left temporaries"] += bool(left)
    print(f"\n{TRIALS} kills over a merge of {duration:.2f} s: {dict(outcomes)}")
    assert outcomes["absent"] + outcomes["previous file kept"] + outcomes["complete"] == TRIALS
    assert outcomes["complete"] >= 1 and outcomes["absent"] + outcomes["previous file kept"] >= 1, dict(outcomes)

    # The next merge removes what the killed ones left, and publishes a complete output.
    done = subprocess.run(merge_command(str(corpus), target, backends[0]), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.listdir(out_dir) == ["merged.pfw"]
    assert complete(target, inputs)
