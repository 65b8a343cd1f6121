"""The soak's short seeded pass (``make soak`` runs the full one: docs/RELIABILITY.md).

About a hundred faults (worker SIGKILL and SIGSTOP, slow and dead clients,
malformed frames, HTTP abuse, slow connections, reloads) under concurrent
ZeroMQ and HTTP load on fake engines and the real llama.cpp engine.
"""

from __future__ import annotations

import json

import pytest

from .soak import SoakConfig, run_soak
from .test_http import free_port

pytestmark = pytest.mark.real_engine


def test_a_short_soak_loses_nothing_and_stays_flat(make_daemon, tmp_path):
    report = run_soak(make_daemon, tmp_path, SoakConfig(faults=100, real_engine=True, time_limit_s=60), free_port)
    print(json.dumps(report, indent=2))
    assert not report["problems"], "\n".join(report["problems"])
    assert report["faults"] >= 100 and report["faults_by_kind"]["worker_kill"] > 0
    assert report["lost"] == report["duplicated"] == report["orphans"] == 0
