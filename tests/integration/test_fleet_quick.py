"""bench/fleet.py --quick runs end to end, so the fleet benchmark cannot rot.

A small fleet (40 simulated registrars, 10 discoverers, one with HAProxy) on a
real 3-member etcd cluster: the properties that must hold at any size are
checked; the timings are only bounded loosely (shared, loaded machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack import require_binary

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_fleet_quick() -> None:
    require_binary("etcd")  # fails, not skips, when a server is missing
    require_binary("haproxy")
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fleet.py"), "--quick"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    details = result["details"]
    assert result["instances"] == 400
    # Steady state: lease keep-alives only, one per host per TTL/3.
    assert set(details["steady"]["by_method"]) == {"LeaseKeepAlive"}
    assert result["steady_etcd_rps"] < result["baseline_steady_etcd_rps"]
    assert details["haproxy_servers"] == 400
    assert result["fanout_missed"] == 0
    # A discoverer of 2 services out of 40 sees only their events.
    events = details["fanout_watch_events"]
    assert events["filtered_discoverer_mean"] < events["full_discoverer"] / 4
    assert details["mass_failure_not_gone"] == 0
    assert result["mass_failure_haproxy_reloads"] == 0
    assert result["mass_restart_deleted"] == 0
    assert details["mass_restart"]["settled"]
