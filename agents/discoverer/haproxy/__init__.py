"""The HAProxy side of the discoverer.

- ``runtime``: the CLI sockets (prompt mode, pipelined batches);
- ``master``: HAProxy's master process (start, adopt, check, reload);
- ``options``: settings to the renderer's options, and the start-time check;
- ``state``: HAProxy's routing table read back (pure);
- ``refusals``: what HAProxy cannot take, and whom its alerts blame;
- ``sink``: the sink the agent drives: runtime commands for instance
  changes, coalesced reloads for new listeners, supervision.
"""

from agents.discoverer.haproxy.master import Master, ProcInfo, parse_show_proc
from agents.discoverer.haproxy.options import check_settings, render_options
from agents.discoverer.haproxy.runtime import HaproxyError, RuntimeClient
from agents.discoverer.haproxy.sink import HaproxySink
from agents.discoverer.haproxy.state import parse_sessions, parse_state

__all__ = [
    "HaproxyError",
    "HaproxySink",
    "Master",
    "ProcInfo",
    "RuntimeClient",
    "check_settings",
    "parse_sessions",
    "parse_show_proc",
    "parse_state",
    "render_options",
]
