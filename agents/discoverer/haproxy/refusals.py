"""What HAProxy cannot take: a port another process holds, and the services
HAProxy's alerts blame for a refused configuration. Pure, but for the bind probe."""

from __future__ import annotations

import re
import socket


def bind_error(address: str, port: int) -> str | None:
    """Why HAProxy could not bind ``address:port`` now (None: it can).

    A plain bind, without SO_REUSEPORT: a port that another process listens
    on is refused, as HAProxy's own bind would be.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as error:
            return f"cannot bind {address}:{port}: {error.strerror}"
    return None


_BIND_ALERT = re.compile(r"\[(?:[0-9.]+|[0-9a-fA-F:]+|\*|):([0-9]{1,5})\]")
_LINE_ALERT = re.compile(r"\[[^\]]*haproxy\.cfg(?:\.new)?:([0-9]+)\]")
_SECTION = re.compile(r"^(?:frontend fe_[0-9]+_|backend )([A-Za-z0-9_.-]+)$")


def culprits(alerts: str, text: str) -> set[str]:
    """The services HAProxy's alerts name: by the port a bind failed on, or
    by the configuration line (the section it is in)."""
    lines = text.split("\n")
    sections: list[str | None] = []
    current: str | None = None
    for line in lines:
        match = _SECTION.match(line)
        current = match[1] if match else (None if line and not line[0].isspace() else current)
        sections.append(current)
    named: set[str] = set()
    for alert in alerts.splitlines():
        if "cannot bind" in alert or "Address already in use" in alert:
            for port in _BIND_ALERT.findall(alert):
                named |= {s for s in _frontends_on(lines, int(port))}
        for number in _LINE_ALERT.findall(alert):
            index = int(number) - 1
            if 0 <= index < len(sections) and sections[index] is not None:
                named.add(str(sections[index]))
    return named


def _frontends_on(lines: list[str], port: int) -> set[str]:
    prefix = f"frontend fe_{port}_"
    return {line.removeprefix(prefix) for line in lines if line.startswith(prefix)}


def main_alert(text: str) -> str:
    """The alert that says what failed: a bind failure if there is one, else
    the first alert (the later ones follow from it), else the last line."""
    alerts = [line.strip() for line in text.splitlines() if "ALERT" in line]
    binds = [line for line in alerts if "cannot bind" in line]
    lines = text.strip().splitlines()
    return (binds or alerts or lines[-1:] or [""])[0][-300:]
