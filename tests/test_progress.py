"""Progress in a log (stderr not a terminal, as under SLURM or `docker run` without -t): plain lines only."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

SCRIPT = """
import time
from pipeline.progress import progress
for _ in progress(range(4), desc="scoring", unit=" props", mininterval=1.0, log_interval=0.05):
    time.sleep(0.04)
"""


def test_a_log_gets_whole_lines_without_carriage_returns_or_escape_codes():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, check=True)
    assert "\r" not in out.stderr and "\x1b" not in out.stderr
    lines = out.stderr.splitlines()
    assert lines[0].startswith("scoring: 0/4 props (0%) in 00:00")
    assert lines[-1].startswith("scoring: 4/4 props (100%) in 00:00")
    assert 3 <= len(lines) <= 6  # a line per 0.05 s of a 0.16 s loop, and the final one
