"""``meshlet init-iptables`` against real iptables, in a network namespace of the test's."""

from __future__ import annotations

import sys

import trio

from ..netns import need_netns, two_hosts


async def test_install_reinstall_and_remove_leave_other_rules_alone() -> None:
    need_netns()
    async with two_hosts() as (host, _):
        # An operator's own rule, which meshlet must never touch.
        await host.run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN")

        first = await host.meshlet("init-iptables", "--inbound-ports", "8080", "--exclude-outbound-ports", "5432")
        assert b"installed" in first.stdout
        assert b"meshlet init-iptables --remove" in first.stdout  # says how to undo
        again = await host.meshlet("init-iptables", "--inbound-ports", "8080", "--exclude-outbound-ports", "5432")
        assert b"replaced" in again.stdout
        saved = (await host.run("iptables-save", "-t", "nat")).stdout.decode()
        assert saved.count("-A OUTPUT -p tcp -j MESHLET_OUTPUT") == 1  # twice run, once installed
        assert saved.count("-A PREROUTING -p tcp -j MESHLET_INBOUND") == 1
        assert "-A MESHLET_OUTPUT -m owner --uid-owner 1337 -j RETURN" in saved
        assert "-A MESHLET_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN" in saved
        assert "-A MESHLET_INBOUND -p tcp -m tcp --dport 8080 -j MESHLET_IN_REDIRECT" in saved
        assert "--dport 53 -j RETURN" in saved

        removed = await host.meshlet("init-iptables", "--remove")
        assert b"removed" in removed.stdout
        saved = (await host.run("iptables-save", "-t", "nat")).stdout.decode()
        assert "MESHLET" not in saved
        assert "-A OUTPUT -p udp -m udp --dport 53 -j RETURN" in saved  # still there


async def test_dry_run_changes_nothing_and_bad_flags_say_why() -> None:
    need_netns()
    async with two_hosts() as (host, _):
        dry = await host.meshlet("init-iptables", "--dry-run", "--proxy-uid", "1000")
        assert b"-A MESHLET_OUTPUT -m owner --uid-owner 1000 -j RETURN" in dry.stdout
        assert "MESHLET" not in (await host.run("iptables-save", "-t", "nat")).stdout.decode()

        for args, says in (
            (["--inbound-ports", "http"], b"--inbound-ports 'http': expected port numbers"),
            (["--proxy-uid", "none"], b"nothing tells the sidecar's own traffic apart"),
            (["--inbound-ports", "15006"], b"would loop"),
            (["--exclude-outbound-cidrs", "10.0.0.0/99"], b"10.0.0.0/99"),
        ):
            bad = await host.meshlet("init-iptables", *args, check=False)
            assert bad.returncode == 2, (args, bad)
            assert says in bad.stderr, (args, bad.stderr)
        assert "MESHLET" not in (await host.run("iptables-save", "-t", "nat")).stdout.decode()


async def test_settings_from_the_environment() -> None:
    """As an init container is configured: MESHLET_<OPTION>."""
    need_netns()
    async with two_hosts() as (host, _):
        result = await trio.run_process(
            host.exec(sys.executable, "-m", "meshlet", "init-iptables", "--dry-run"),
            capture_stdout=True,
            capture_stderr=True,
            env={"MESHLET_PROXY_UID": "2000", "MESHLET_EXCLUDE_OUTBOUND_PORTS": "6379", "PATH": "/usr/sbin:/usr/bin"},
        )
        assert b"--uid-owner 2000" in result.stdout
        assert b"--dport 6379 -j RETURN" in result.stdout


async def test_without_privileges_it_says_what_to_do() -> None:
    need_netns()
    async with two_hosts() as (host, _):
        as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
        for extra in ([], ["--remove"]):
            result = await host.run(*as_nobody, sys.executable, "-m", "meshlet", "init-iptables", *extra, check=False)
            assert result.returncode == 1, result
            assert b"run it as root (or with CAP_NET_ADMIN)" in result.stderr, result.stderr
