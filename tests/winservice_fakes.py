"""Fakes of the pywin32 modules the Windows service uses, and a fake service control manager.

These machines run Linux: nothing here runs Windows code.  The fakes record
what the service asks of Windows (service statuses, event log entries, job
objects) and :class:`FakeScm` drives the service the way pythonservice.exe
does: SvcRun on a service thread, controls from another thread, and
SERVICE_STOPPED reported by the framework once SvcRun returns.  Tests built
on them exercise the service's control flow, not its Windows calls.

The framework class copies the parts of pywin32's ``ServiceFramework`` the
service relies on (win32/Lib/win32serviceutil.py): the status tuple, the
controls accepted per state, and the control dispatch.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

# The real values (winsvc.h, winnt.h, winerror.h), so recorded tuples read as Windows would see them.
SERVICE_STOPPED, SERVICE_START_PENDING, SERVICE_STOP_PENDING, SERVICE_RUNNING = 1, 2, 3, 4
SERVICE_CONTROL_STOP, SERVICE_CONTROL_INTERROGATE, SERVICE_CONTROL_SHUTDOWN = 1, 4, 5
SERVICE_ACCEPT_STOP, SERVICE_ACCEPT_SHUTDOWN = 1, 4
SERVICE_WIN32_OWN_PROCESS = 0x10
ERROR_SERVICE_SPECIFIC_ERROR = 1066
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
PROCESS_TERMINATE, PROCESS_SET_QUOTA = 0x0001, 0x0100
EVENTLOG_ERROR_TYPE, EVENTLOG_WARNING_TYPE, EVENTLOG_INFORMATION_TYPE = 1, 2, 4
PYS_SERVICE_STARTING, PYS_SERVICE_STARTED, PYS_SERVICE_STOPPING, PYS_SERVICE_STOPPED = (
    0x40000001,
    0x40000002,
    0x40000003,
    0x40000004,
)


@dataclass
class FakeJob:
    limits: dict[str, Any] = field(default_factory=lambda: {"BasicLimitInformation": {"LimitFlags": 0}})
    pids: list[int] = field(default_factory=list)

    @property
    def kills_on_close(self) -> bool:
        return bool(self.limits["BasicLimitInformation"]["LimitFlags"] & JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE)


class FakeProcessHandle:
    def __init__(self, pid: int, access: int) -> None:
        self.pid, self.access, self.closed = pid, access, False

    def Close(self) -> None:
        self.closed = True


@dataclass
class Windows:
    """What the service asked of Windows, in order."""

    statuses: list[tuple[int, ...]] = field(default_factory=list)  # SetServiceStatus tuples
    events: list[tuple[str, Any]] = field(default_factory=list)  # (kind, message or (type, id, inserts))
    jobs: list[FakeJob] = field(default_factory=list)
    handles: list[FakeProcessHandle] = field(default_factory=list)
    open_process_error: Exception | None = None  # OpenProcess raises this when set
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def states(self) -> list[int]:
        """dwCurrentState of each report, repeats (progress checkpoints) folded."""
        with self._lock:
            return [state for state, _ in itertools.groupby(status[1] for status in self.statuses)]

    def errors(self) -> list[str]:
        return [message for kind, message in self.events if kind == "error"]

    def logged_ids(self) -> list[int]:
        return [message[1] for kind, message in self.events if kind == "msg"]


def fake_modules(windows: Windows) -> dict[str, ModuleType]:
    """win32service, win32serviceutil, servicemanager, winerror, win32job, win32api, win32con."""
    modules = {
        name: ModuleType(name)
        for name in (
            "win32service",
            "win32serviceutil",
            "servicemanager",
            "winerror",
            "win32job",
            "win32api",
            "win32con",
        )
    }
    svc, util, manager = modules["win32service"], modules["win32serviceutil"], modules["servicemanager"]
    for name, value in globals().items():
        if name.startswith(("SERVICE_", "ERROR_", "EVENTLOG_", "PYS_", "JOB_", "PROCESS_")):
            for module in modules.values():
                setattr(module, name, value)

    def set_service_status(handle: Any, status: tuple[int, ...]) -> None:
        assert handle == "status-handle" and len(status) == 7, status
        with windows._lock:
            windows.statuses.append(status)

    svc.SetServiceStatus = set_service_status
    manager.RegisterServiceCtrlHandler = lambda name, handler, extended=False: "status-handle"
    manager.SetEventSourceName = lambda name, register_now=False: None
    manager.LogMsg = lambda kind, event_id, inserts=None: windows.events.append(("msg", (kind, event_id, inserts)))
    manager.LogInfoMsg = lambda message: windows.events.append(("info", message))
    manager.LogWarningMsg = lambda message: windows.events.append(("warning", message))
    manager.LogErrorMsg = lambda message: windows.events.append(("error", message))
    util.ServiceFramework = FakeServiceFramework
    util.HandleCommandLine = lambda cls, serviceClassString=None, argv=None, **_: (
        windows.events.append(("command line", (cls, argv))) or 0
    )
    _job_api(modules, windows)
    return modules


def _job_api(modules: dict[str, ModuleType], windows: Windows) -> None:
    job_module, api = modules["win32job"], modules["win32api"]
    job_module.JobObjectExtendedLimitInformation = 9

    def create_job(attributes: Any, name: str) -> FakeJob:
        assert attributes is None and isinstance(name, str)  # pywin32 312 wants a string name
        windows.jobs.append(FakeJob())
        return windows.jobs[-1]

    def set_limits(job: FakeJob, info_class: int, info: dict[str, Any]) -> None:
        assert info_class == job_module.JobObjectExtendedLimitInformation
        job.limits = info

    def open_process(access: int, inherit: bool, pid: int) -> FakeProcessHandle:
        if windows.open_process_error is not None:
            raise windows.open_process_error
        windows.handles.append(FakeProcessHandle(pid, access))
        return windows.handles[-1]

    def assign(job: FakeJob, handle: FakeProcessHandle) -> None:
        assert not handle.closed and handle.access & PROCESS_SET_QUOTA and handle.access & PROCESS_TERMINATE
        job.pids.append(handle.pid)

    job_module.CreateJobObject = create_job
    job_module.QueryInformationJobObject = lambda job, info_class: {
        "BasicLimitInformation": dict(job.limits["BasicLimitInformation"])
    }
    job_module.SetInformationJobObject = set_limits
    job_module.AssignProcessToJobObject = assign
    api.OpenProcess = open_process


class FakeServiceFramework:
    """pywin32's ServiceFramework, as far as the service uses it."""

    def __init__(self, args: Any) -> None:
        import servicemanager

        self.ssh = servicemanager.RegisterServiceCtrlHandler(args[0], self.ServiceCtrlHandlerEx, True)
        servicemanager.SetEventSourceName(self._svc_name_)  # type: ignore[attr-defined]
        self.checkPoint = 0

    def GetAcceptedControls(self) -> int:
        accepted = SERVICE_ACCEPT_STOP if hasattr(self, "SvcStop") else 0
        return accepted | (SERVICE_ACCEPT_SHUTDOWN if hasattr(self, "SvcShutdown") else 0)

    def ReportServiceStatus(
        self, serviceStatus: int, waitHint: int = 5000, win32ExitCode: int = 0, svcExitCode: int = 0
    ) -> None:
        import win32service

        if self.ssh is None:  # debugging
            return
        accepted = 0 if serviceStatus == SERVICE_START_PENDING else self.GetAcceptedControls()
        if serviceStatus in (SERVICE_RUNNING, SERVICE_STOPPED):
            check_point = 0
        else:
            self.checkPoint += 1
            check_point = self.checkPoint
        win32service.SetServiceStatus(
            self.ssh,
            (SERVICE_WIN32_OWN_PROCESS, serviceStatus, accepted, win32ExitCode, svcExitCode, check_point, waitHint),
        )

    def SvcInterrogate(self) -> None:
        self.ReportServiceStatus(SERVICE_RUNNING)

    def ServiceCtrlHandlerEx(self, control: int, event_type: int, data: Any) -> Any:
        handlers = {
            SERVICE_CONTROL_STOP: "SvcStop",
            SERVICE_CONTROL_INTERROGATE: "SvcInterrogate",
            SERVICE_CONTROL_SHUTDOWN: "SvcShutdown",
        }
        return getattr(self, handlers[control])()

    def SvcRun(self) -> None:
        self.ReportServiceStatus(SERVICE_RUNNING)
        self.SvcDoRun()  # type: ignore[attr-defined]
        self.ReportServiceStatus(SERVICE_STOP_PENDING)


class ProcessEnded(BaseException):
    """The service ended its process (os._exit): nothing after it runs."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class FakeScm:
    """Hosts one service as pythonservice.exe does, and sends it controls."""

    def __init__(self, service_class: type, windows: Windows) -> None:
        self.windows = windows
        self.service = service_class(("node-supervisor",))
        self.service.end_process = self._end_process  # an instance attribute: called with the code alone
        self.process_exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._service_main, name="service-main", daemon=True)

    def start(self) -> "FakeScm":
        self._thread.start()
        return self

    def control(self, code: int) -> Any:
        return self.service.ServiceCtrlHandlerEx(code, 0, None)

    def wait_stopped(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the service thread did not end"

    def _service_main(self) -> None:
        try:
            self.service.SvcRun()
        except ProcessEnded as ended:
            self.process_exit_code = ended.code
            return
        except Exception as exc:  # the framework reports an error stop and logs the traceback
            self.error = exc
            self.windows.statuses.append(
                (SERVICE_WIN32_OWN_PROCESS, SERVICE_STOPPED, 0, ERROR_SERVICE_SPECIFIC_ERROR, 0x20000001, 0, 0)
            )
            return
        self.windows.statuses.append((SERVICE_WIN32_OWN_PROCESS, SERVICE_STOPPED, 0, 0, 0, 0, 0))

    @staticmethod
    def _end_process(code: int) -> None:
        raise ProcessEnded(code)
