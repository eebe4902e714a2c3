"""Which services HAProxy's alerts blame, and the bind probe: pure or local."""

from __future__ import annotations

import socket

from agents.discoverer.config import RenderOptions, render_config
from agents.discoverer.haproxy.refusals import bind_error, culprits
from agents.discoverer.model import Server, Service

CATALOG = {
    "web": Service("web", 40111, "tcp", {"a": Server("a", "127.0.0.1", 1)}),
    "api": Service("api", 40112, "http", {"b": Server("b", "127.0.0.1", 2)}),
}
TEXT = render_config(CATALOG, RenderOptions(state_dir="/run/pf", stats_address="off"))


def _line_of(text: str, start: str) -> int:
    return next(n for n, line in enumerate(text.split("\n"), 1) if line.startswith(start))


def test_a_bind_alert_names_the_frontend_on_that_port() -> None:
    line = _line_of(TEXT, "frontend fe_40111_web")
    alert = (
        f"[ALERT]    (10546) : Binding [/run/pf/haproxy.cfg:{line + 1}] for frontend "
        "fe_40111_web: cannot bind socket (Address already in use) for [127.0.0.1:40111]"
    )
    assert culprits(alert, TEXT) == {"web"}


def test_a_parsing_alert_names_the_section_of_its_line() -> None:
    line = _line_of(TEXT, "backend api") + 2
    alert = f"[ALERT]    (1) : config : parsing [/run/pf/haproxy.cfg.new:{line}] : unknown keyword"
    assert culprits(alert, TEXT) == {"api"}


def test_an_alert_about_the_global_section_names_no_service() -> None:
    alert = "[ALERT]    (1) : config : parsing [/run/pf/haproxy.cfg:3] : unknown keyword"
    assert culprits(alert, TEXT) == set()


def test_the_bind_probe_sees_a_port_another_process_listens_on() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "Address already in use" in str(bind_error("127.0.0.1", port))
    assert bind_error("127.0.0.1", port) is None
