"""Child processes that end with the process that started them.

The embedded broker (started in a session of its own, so that Ctrl-C reaches only us) and the
bench's `liqmon run` and worker processes outlived a parent killed with SIGKILL: a bench cut
short by a timeout left a monitor and a broker running for hours. On Linux the child asks the
kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), through a small launcher that
then executes the real command: the child keeps its pid, and nothing runs in the forked child
before ``exec`` (``preexec_fn`` is unsafe in a process with threads, as ours are).

The kernel signals the child when the *thread* that started it ends: start tied children from
a thread that lives as long as the parent (the main thread or the event loop's), never from a
worker thread."""

from __future__ import annotations

import os
import sys

PR_SET_PDEATHSIG = 1

# -S: no site import (the launcher needs only the standard library), so it starts in a few ms.
_LAUNCHER = f"""\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, signal.SIGKILL)
if os.getppid() != int(sys.argv[1]):
    sys.exit("liqmon: the process that started this one is gone; not starting " + sys.argv[2])
os.execvp(sys.argv[2], sys.argv[2:])
"""


def tied_to_us(argv: list[str]) -> list[str]:
    """``argv`` run so that the process ends when this one does (Linux; elsewhere ``argv``
    unchanged). The pid of the process started is the command's own."""
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]
