"""From the discoverer's settings to the renderer's options, and the start-time
check that the rendered configuration is one HAProxy accepts."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import jinja2

from agents.common.settings import DiscovererSettings
from agents.discoverer.config import ConfigError, RenderOptions, render_config


def render_options(settings: DiscovererSettings, euid: int | None = None) -> RenderOptions:
    """What the renderer needs from the settings; euid decides the privilege drop.

    Started by root, HAProxy's workers switch to the configured user and group
    after binding; the master-worker master keeps root (HAProxy's design: it
    re-executes itself to reload and hands the listening sockets over).
    """
    user, group = settings.haproxy_account(os.geteuid() if euid is None else euid)
    return RenderOptions(
        state_dir=str(Path(settings.state_dir).absolute()),
        bind_address=settings.bind_address,
        stats_address=settings.stats_address,
        drain_timeout=settings.drain_timeout,
        template=settings.template,
        stats_auth=settings.stats_auth,
        user=user,
        group=group,
    )


def check_settings(settings: DiscovererSettings) -> str | None:
    """Render an empty catalog and ``haproxy -c`` it: one line saying what fails, or None.

    Run once at start, so a template or a setting that cannot produce a valid
    configuration stops the agent then, not at every later render. The text
    goes through a pipe: no file to clean up, and the stats password never
    lands outside the state directory.
    """
    try:
        text = render_config({}, render_options(settings))
    except (ConfigError, jinja2.TemplateError) as error:
        return f"the HAProxy configuration cannot be rendered: {_one_line(str(error))}"
    try:
        check = subprocess.run(
            [settings.haproxy_binary, "-c", "-f", _STDIN],
            input=text.encode(),
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"cannot run {settings.haproxy_binary} -c: {_one_line(str(error))}"
    output = (check.stdout + check.stderr).decode(errors="replace").replace(f"{_STDIN}:", "line ")
    if check.returncode == 0 or (check.returncode == 2 and "has no error" in output):
        return None  # 2: valid, but no listener yet (a template without a stats socket)
    alerts = [line for line in output.splitlines() if "[ALERT]" in line] or [output]
    reason = re.sub(r"^\[ALERT\]\s*\(\d+\)\s*:\s*(config\s*:\s*)?", "", alerts[0].strip())
    return f"haproxy -c refuses the rendered configuration: {_one_line(reason)}"


_STDIN = "/dev/stdin"


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:297] + "..."
