"""A step subprocess dies with the run worker that started it.

Dagster's multiprocess executor starts each step in a child process of the run worker.
If the run worker is killed (`kill -9`, OOM killer, a closed terminal), the child keeps
computing, reparented to PID 1, and nobody waits for its result. On Linux we ask the kernel
to send the child SIGKILL when its parent exits (`prctl(PR_SET_PDEATHSIG)`); elsewhere this
is a no-op and the stale-run check at the next run start (orchestration/runs.py) remains.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_GET_PDEATHSIG = 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def parent_death_signal() -> int:
    """The signal this process receives when its parent exits (0: none; always 0 off Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    value = ctypes.c_int(0)
    if _libc().prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_GET_PDEATHSIG) failed")
    return value.value


def die_with_parent(only_multiprocessing_child: bool = True) -> bool:
    """Have the kernel SIGKILL this process when its parent exits; True if it was set.

    Only in a process started by `multiprocessing` (a Dagster step subprocess) unless told
    otherwise: a run worker or a test process must not die with its own parent (a shell).
    The kernel ties the signal to the thread that forked us; Dagster starts step processes
    from the run worker's main thread, which lives as long as the run.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = multiprocessing.parent_process()
    if only_multiprocessing_child and parent is None:
        return False
    parent_pid = os.getppid()
    if _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have died before the prctl call took effect: then nobody would signal us.
    if os.getppid() != parent_pid or (parent is not None and not parent.is_alive()):
        os.kill(os.getpid(), signal.SIGKILL)
    return True
