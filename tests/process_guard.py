"""No process the suite starts outlives it.

At session start the pytest process becomes a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``):
a process the suite started whose own parent dies is re-parented to pytest instead of init. At
session end every child of pytest that still runs is such a leftover (a server a test did not
stop, a worker orphaned by a killed master): each is named, killed, and the session fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

import pytest

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def children(pid: int) -> dict[int, str]:
    """Live (not zombie) children of ``pid``: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found[int(entry)] = cmd
    return found


def reap() -> None:
    """Collect exited orphans (as a subreaper, pytest is their parent now)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def leftovers(grace: float = 3.0) -> dict[int, str]:
    """Children still running after ``grace`` seconds (processes being stopped get time)."""
    deadline = time.monotonic() + grace
    while True:
        reap()
        left = children(os.getpid())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def pytest_sessionstart(session: pytest.Session) -> None:
    become_subreaper()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = leftovers()
    if not left:
        return
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    reap()
    lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in sorted(left.items()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"processes started by the test suite were still running at its end " \
              f"(killed now):\n{lines}"
    if reporter is not None:
        reporter.write_sep("!", "leftover processes", red=True, bold=True)
        reporter.write_line(message)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
