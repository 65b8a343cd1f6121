"""The Windows service: what the service control manager (SCM) sees of the daemon.

    python -m winservice install|remove|start|stop|debug

Statuses, in order: START_PENDING while the daemon prepares (each line of an
environment build is a new checkpoint, so a first start that compiles
llama.cpp is not taken for a hang), RUNNING once it serves, STOP_PENDING
from the stop control (or a system shutdown) until its ordered shutdown has
ended every worker, then STOPPED.  Stop and shutdown go to the daemon's one
``request_stop`` path, as SIGTERM does on Linux.

A start that fails (configuration, an endpoint in use, environments) is
reported as STOPPED with ERROR_SERVICE_SPECIFIC_ERROR and the daemon's own
exit code as the service-specific code (78: fix the configuration), and an
error in the Application event log says why.  Start and stop are logged
there too, under the source "node-supervisor".

The workers are in a Job Object that kills them when this process ends
(supervisor/io/job_object.py), so none outlives the service, even one that
is killed.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import servicemanager
import win32service
import win32serviceutil
import winerror

from supervisor.config import Settings

from .runner import RunOutcome, ServiceRun

START_WAIT_HINT_MS = 30_000  # until the first progress report
STOP_EXTRA_WAIT_MS = 10_000  # on top of the daemon's own grace periods


class NodeSupervisorService(win32serviceutil.ServiceFramework):
    _svc_name_ = "node-supervisor"
    _svc_display_name_ = "node-supervisor"
    _svc_description_ = "Keeps local LLM inference running on this node: engine workers, supervision, ZeroMQ clients."

    # Ends the process after a failed start has been reported (see _fail); tests replace it.
    end_process = staticmethod(os._exit)

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.daemon_run = ServiceRun(on_progress=self._starting, on_serving=self._serving)
        self._status_lock = threading.RLock()  # a status change and the check before it are one step
        self._stopping = False
        self._last_status = (win32service.SERVICE_START_PENDING, START_WAIT_HINT_MS)

    def SvcRun(self) -> None:
        """The service thread.  The framework's own SvcRun reports RUNNING before
        any work is done; here RUNNING waits until the daemon serves."""
        self._report(win32service.SERVICE_START_PENDING, START_WAIT_HINT_MS)
        self.SvcDoRun()
        self._report(win32service.SERVICE_STOP_PENDING, STOP_EXTRA_WAIT_MS)
        # Returning ends the service thread; the framework then reports SERVICE_STOPPED.

    def SvcDoRun(self) -> None:
        servicemanager.LogMsg(
            servicemanager.EVENTLOG_INFORMATION_TYPE, servicemanager.PYS_SERVICE_STARTING, (self._svc_name_, "")
        )
        outcome = self.daemon_run.run()
        if outcome.code != 0:
            self._fail(outcome)
            return
        servicemanager.LogMsg(
            servicemanager.EVENTLOG_INFORMATION_TYPE, servicemanager.PYS_SERVICE_STOPPED, (self._svc_name_, "")
        )

    def SvcStop(self) -> None:
        self._stop("service stop")

    def SvcShutdown(self) -> None:
        self._stop("system shutdown")

    def SvcInterrogate(self) -> None:
        """Tell the status as it is (the framework's answers RUNNING whatever the state)."""
        with self._status_lock:
            status, wait_ms = self._last_status
            self._report(status, wait_ms)

    # --- from the daemon's run ---------------------------------------------------------

    def _starting(self, wait_ms: int) -> None:
        with self._status_lock:
            if not self._stopping:
                self._report(win32service.SERVICE_START_PENDING, wait_ms)

    def _serving(self, settings: Settings) -> None:
        with self._status_lock:
            if self._stopping:
                return
            self._report(win32service.SERVICE_RUNNING, 0)
        servicemanager.LogMsg(
            servicemanager.EVENTLOG_INFORMATION_TYPE, servicemanager.PYS_SERVICE_STARTED, (self._svc_name_, "")
        )
        servicemanager.LogInfoMsg(
            f"node-supervisor serving clients at {settings.client_endpoint}; log in {settings.log_dir}"
        )

    def _stop(self, reason: str) -> None:
        settings = self.daemon_run.settings
        with self._status_lock:
            self._stopping = True
            self._report(win32service.SERVICE_STOP_PENDING, _stop_wait_ms(settings))
        self.daemon_run.stop(reason)

    def _fail(self, outcome: RunOutcome) -> None:
        """Event log, then STOPPED with the daemon's exit code, then the process ends.

        Ending the process is what carries the code: after this method the
        framework would report SERVICE_STOPPED again with code 0, and a
        second STOPPED report after the first is one the SCM documents as
        unsafe.  The daemon has returned; a worker an internal error may
        have left running is ended with the process by its Job Object.
        """
        servicemanager.LogErrorMsg(outcome.message())
        with self._status_lock:
            self._stopping = True
            self._report(win32service.SERVICE_STOPPED, 0, exit_code=outcome.code)
        if self.ssh is not None:  # under the SCM; `debug` runs in a console and simply returns
            logging.shutdown()
            self.end_process(outcome.code)

    def _report(self, status: int, wait_ms: int, exit_code: int = 0) -> None:
        """A nonzero ``exit_code`` is the daemon's, reported as service-specific."""
        with self._status_lock:
            self._last_status = (status, wait_ms)
            if exit_code:
                self.ReportServiceStatus(
                    status, waitHint=wait_ms, win32ExitCode=winerror.ERROR_SERVICE_SPECIFIC_ERROR, svcExitCode=exit_code
                )
            else:
                self.ReportServiceStatus(status, waitHint=wait_ms)


def _stop_wait_ms(settings: Settings | None) -> int:
    """Requests get shutdown_grace_s, workers as long again, then SIGTERM/kill take a few seconds."""
    grace_s = settings.shutdown_grace_s if settings is not None else 5.0
    return int(2 * grace_s * 1000) + STOP_EXTRA_WAIT_MS
