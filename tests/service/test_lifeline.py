"""Processes liqmon starts (the embedded broker, the bench's monitors and workers) end when the
process that started them is killed, even with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from monitor.service.lifeline import tied_to_us

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG is Linux's")

# A parent that starts a child and says its pid, then waits to be killed.
PARENT = """\
import subprocess, sys, time
from monitor.service.lifeline import tied_to_us
{start}
print(pid, flush=True)
time.sleep(600)
"""
SLEEPER = """\
child = subprocess.Popen(tied_to_us(["sh", "-c", "echo running; exec sleep 600"]),
                         stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "running\\n"  # past the launcher: the command runs
pid = child.pid
"""
BROKER = """\
from monitor.service.broker import EmbeddedBroker
pid = EmbeddedBroker().start().process.pid
"""


def alive(pid: int) -> bool:
    """Running, and not a zombie (the child's parent is gone, init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def child_of_killed_parent(start: str) -> int:
    """Start a parent running ``start``, SIGKILL it once its child runs, return the child's
    pid."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(start=start)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert alive(pid)
    finally:
        parent.kill()
        parent.wait()
    return pid


def gone_soon(pid: int) -> bool:
    """Whether the process ends within 10 s: a liveness wait, not a timing."""
    deadline = time.monotonic() + 10
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # leave nothing behind either way
            return False
        time.sleep(0.02)
    return True


def test_a_tied_child_ends_when_its_parent_is_killed() -> None:
    assert gone_soon(child_of_killed_parent(SLEEPER))


def test_the_embedded_broker_ends_when_the_process_that_started_it_is_killed() -> None:
    assert gone_soon(child_of_killed_parent(BROKER))


def test_a_tied_child_is_the_command_itself_under_the_pid_it_was_started_with() -> None:
    # what waits for it, signals it or reads /proc/PID (the broker's listening check) finds
    # the command, not a launcher
    child = subprocess.Popen(tied_to_us([sys.executable, "-c", "import os; print(os.getpid())"]),
                             stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate()
    assert child.returncode == 0
    assert int(out) == child.pid


def test_a_child_whose_parent_is_gone_before_it_starts_does_not_run_the_command() -> None:
    argv = tied_to_us(["echo", "ran"])
    argv[argv.index(str(os.getpid()))] = "1"  # as if the starter had died and init adopted us
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "the process that started this one is gone; not starting echo" in done.stderr
