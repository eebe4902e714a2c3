"""What the discoverer and the catalog import.

They run as systemd dynamic users without a HOME; aiodocker reads
``Path.home()`` when it is imported, so a top-level import of it anywhere on
their path stops those agents before they start (seen in the systemd
deployment test, after ``pilotfish drain`` joined the CLI). Only the commands
that talk to Docker import it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "modules",
    [
        ["agents.cli"],
        ["agents.cli", "agents.discoverer.agent", "agents.discoverer.haproxy"],
        ["agents.cli", "agents.catalog.agent"],
    ],
)
def test_docker_is_not_imported_on_the_way_to(modules: list[str]) -> None:
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "import agents.cli\n"
        "agents.cli.build_parser()\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'aiodocker')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "", f"{modules[-1]} imports {result.stdout.strip()}"
