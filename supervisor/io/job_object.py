"""Windows: every worker in one Job Object, so that none outlives the daemon's process.

On Linux a worker learns of the daemon's death from PR_SET_PDEATHSIG and
from the heartbeats that stop.  On Windows the kernel does it: the job is
created with ``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE`` and its one handle is
held by this process (not inheritable), so when the process ends for any
reason (a service stop, a crash, ``taskkill /F``) the handle closes and every
process in the job is terminated, the workers' own children included.
Elsewhere ``contain`` does nothing.

A worker is assigned right after it is spawned.  It has not started a child
of its own by then (the interpreter is still starting), and children it
starts later are in the job from birth.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from ..logs import get_logger

log = get_logger("supervisor.job_object")

USE_JOB_OBJECTS = sys.platform == "win32"  # tests switch it on with fake win32 modules
_job: Any = None  # the job's handle; lives as long as the process, which is the point
_job_lock = threading.Lock()


def contain(pid: int) -> bool:
    """Put a just-spawned worker into the daemon's job; True when it is in.

    A failure is logged and the worker serves anyway (its heartbeats still
    end it when the daemon goes), so spawning never fails because of it.
    """
    if not USE_JOB_OBJECTS:
        return False
    try:
        import win32api
        import win32con
        import win32job

        job = _the_job(win32job)
        process = win32api.OpenProcess(win32con.PROCESS_SET_QUOTA | win32con.PROCESS_TERMINATE, False, pid)
        try:
            win32job.AssignProcessToJobObject(job, process)
        finally:
            process.Close()
    except Exception as exc:  # pywintypes.error, or pywin32 missing: never a reason to lose the worker
        log.warning(
            "worker not placed in the job object; it may outlive the daemon if the daemon is killed",
            pid=pid,
            error=str(exc),
        )
        return False
    return True


def _the_job(win32job: Any) -> Any:
    """The one job, created on first use with kill-on-close set."""
    global _job
    with _job_lock:
        if _job is None:
            job = win32job.CreateJobObject(None, "")  # unnamed; pywin32 wants a string, not None
            info = win32job.QueryInformationJobObject(job, win32job.JobObjectExtendedLimitInformation)
            info["BasicLimitInformation"]["LimitFlags"] |= win32job.JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
            win32job.SetInformationJobObject(job, win32job.JobObjectExtendedLimitInformation, info)
            _job = job
        return _job
