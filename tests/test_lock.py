"""One flow run per project: a second waits or refuses in one line; a killed holder leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.lock import Busy, lock_path, project_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = "from flows.lock import project_lock; import sys, time\nwith project_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"


def hold(root: Path) -> subprocess.Popen:
    """Another process holding the project's lock, like a running flow."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_refuses_naming_the_holder_then_gets_it_once_the_holder_is_killed(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(Busy, match=rf"busy: the run started .* by pid {holder.pid} "):
            with project_lock(tmp_path, wait=False):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # kill -9: no clean-up ran, the kernel still dropped the lock
        holder.wait()
    with project_lock(tmp_path, wait=False):
        assert '"pid": %d' % os.getpid() in lock_path(tmp_path).read_text()
    assert lock_path(tmp_path).read_text() == ""  # released: nothing claims to hold it


def test_a_second_run_waits_saying_so_once(tmp_path):
    holder = hold(tmp_path)
    said: list[str] = []
    try:
        subprocess.Popen(["sh", "-c", f"sleep 1.5; kill {holder.pid}"])
        start = time.monotonic()
        with project_lock(tmp_path, poll_s=0.2, say=said.append):
            waited = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert waited >= 1.0 and len(said) == 1 and said[0].startswith("waiting for the run started")


def test_reentrant_in_one_process(tmp_path):
    with project_lock(tmp_path, wait=False):
        with project_lock(tmp_path, wait=False):  # the flow body inside the CLI's hold
            pass
        assert lock_path(tmp_path).read_text()  # still held by the outer one


def test_flow_cli_refuses_in_one_line_with_exit_2(tmp_path):
    holder = hold(tmp_path)
    try:
        out = subprocess.run([sys.executable, "-m", "flows.lifecycle", "--root", str(tmp_path), "--no-wait"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: project") and f"pid {holder.pid}" in lines[0]
    assert "Traceback" not in out.stderr
