"""The stats page and the privilege drop in the rendered configuration (grammar-checked)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agents.common.settings import DiscovererSettings
from agents.discoverer.config import ConfigError, RenderOptions, grammar_violations, render_config
from agents.discoverer.haproxy import render_options


def _lines(options: RenderOptions) -> list[str]:
    text = render_config({}, options)
    assert grammar_violations(text) == []
    return text.splitlines()


def test_default_stats_page_is_loopback_and_hides_the_version() -> None:
    lines = _lines(render_options(DiscovererSettings(state_dir="/run/pf"), euid=1000))
    assert "    bind 127.0.0.1:1936" in lines
    assert "    stats hide-version" in lines
    assert not [
        line for line in lines if line.startswith(("    stats auth", "    user", "    group"))
    ]


def test_credentials_and_account_are_rendered() -> None:
    options = RenderOptions(
        state_dir="/run/pf", stats_auth=("admin", "s3cret"), user="haproxy", group="haproxy"
    )
    lines = _lines(options)
    assert "    stats auth admin:s3cret" in lines
    assert lines.index("    user haproxy") < lines.index("defaults")
    assert "    group haproxy" in lines


def test_privilege_drop_follows_the_euid() -> None:
    settings = DiscovererSettings(
        state_dir="/run/pf", haproxy_user="nobody", haproxy_group="nogroup"
    )
    assert render_options(settings, euid=0).user == "nobody"
    assert render_options(settings, euid=0).group == "nogroup"
    assert render_options(settings, euid=1000).user is None
    assert render_options(settings, euid=1000).group is None


text = st.text(max_size=70)


@given(text, text, st.one_of(st.none(), text), st.one_of(st.none(), text))
def test_hostile_credentials_and_accounts_are_refused_or_clean(
    user: str, password: str, account: str | None, group: str | None
) -> None:
    options = RenderOptions(
        state_dir="/run/pf", stats_auth=(user, password), user=account, group=group
    )
    try:
        rendered = render_config({}, options)
    except ConfigError:
        return
    assert grammar_violations(rendered) == []
