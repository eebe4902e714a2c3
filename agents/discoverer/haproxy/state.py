"""HAProxy's actual routing table, read back from ``show stat`` and
``show servers state``: pure parsing."""

from __future__ import annotations

import csv
import ipaddress
import re

from agents.common.schema import NAME_PATTERN
from agents.discoverer.model import Catalog, Server, ServerState, Service

_FRONTEND_RE = re.compile(r"^fe_([0-9]{1,5})_(.+)$")
_NAME_RE = re.compile(NAME_PATTERN)
# srv_admin_state flags (server-t.h): FMAINT|IMAINT|CMAINT|RMAINT|HMAINT, FDRAIN|IDRAIN.
_ADMIN_MAINT = 0x01 | 0x02 | 0x04 | 0x20 | 0x40
_ADMIN_DRAIN = 0x08 | 0x10
# srv_check_state flags (check-t.h): CONFIGURED | ENABLED.
_CHECK_ON = 0x02 | 0x04

# -- reading HAProxy's state back ---------------------------------------------------


def parse_state(show_stat: str, servers_state: str) -> Catalog:
    """HAProxy's actual routing table, as a Catalog (state may be "maint")."""
    listeners: dict[str, tuple[int, str]] = {}
    backends: set[str] = set()
    lines = show_stat.splitlines()
    if lines and lines[0].startswith("# "):
        for row in csv.DictReader([lines[0][2:], *lines[1:]]):
            proxy, kind = row.get("pxname") or "", row.get("svname")
            match = _FRONTEND_RE.match(proxy)
            if kind == "FRONTEND" and match and row.get("mode") in ("tcp", "http"):
                listeners[match[2]] = (int(match[1]), row["mode"])
            elif kind == "BACKEND":
                backends.add(proxy)
    catalog: Catalog = {
        name: Service(name, port, "http" if mode == "http" else "tcp")
        for name, (port, mode) in listeners.items()
        if name in backends and _NAME_RE.fullmatch(name)
    }
    header: list[str] = []
    for line in servers_state.splitlines():
        if line.startswith("# "):
            header = line[2:].split()
            continue
        fields = line.split()
        if not header or len(fields) < len(header):
            continue  # the version line, or garbage
        row = dict(zip(header, fields, strict=False))
        service = catalog.get(row["be_name"])
        if service is None:
            continue
        admin = int(row["srv_admin_state"])
        state: ServerState = (
            "maint" if admin & _ADMIN_MAINT else "draining" if admin & _ADMIN_DRAIN else "up"
        )
        service.servers[row["srv_name"]] = Server(
            name=row["srv_name"],
            address=str(ipaddress.ip_address(row["srv_addr"])),
            port=int(row["srv_port"]),
            weight=int(row["srv_uweight"]),
            check=int(row["srv_check_state"]) & _CHECK_ON == _CHECK_ON,
            state=state,
        )
    return catalog


def parse_sessions(show_stat: str, server: str) -> int:
    """Current sessions + queued requests of ``server`` in a `show stat <be> 4 -1` answer."""
    return parse_all_sessions(show_stat).get(server, 0)


def parse_all_sessions(show_stat: str) -> dict[str, int]:
    """Server name -> current sessions + queued requests, from a `show stat <be> 4 -1` answer."""
    lines = show_stat.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    sessions: dict[str, int] = {}
    for row in csv.DictReader([lines[0][2:], *lines[1:]]):
        name = row.get("svname")
        if name and name not in ("FRONTEND", "BACKEND"):
            sessions[name] = _count(row.get("scur")) + _count(row.get("qcur"))
    return sessions


def _count(field: str | None) -> int:
    return int(field) if field and field.isdigit() else 0
