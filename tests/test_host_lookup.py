"""The warning for a host that cannot resolve its own name: its rule, and a real server started
on such a host (a mount and UTS namespace whose host name is in no /etc/hosts and whose DNS
server never answers) that says in its log why it started late."""

from __future__ import annotations

import logging
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from clip_runner.host_lookup import (
    SLOW_LOOKUP_S,
    check_host_lookup,
    check_host_lookup_in_background,
    slow_lookup_warning,
    timed_lookup,
)
from tests.helpers import serve_tiny

WARNING_START = "resolving this host's own name"


def test_a_quick_lookup_gets_no_warning():
    assert slow_lookup_warning("box", SLOW_LOOKUP_S - 0.01) is None


def test_a_slow_lookups_warning_names_the_host_the_wait_and_the_fix():
    warning = slow_lookup_warning("gpu-box", 10.04)
    assert warning is not None
    assert warning.startswith(WARNING_START)
    assert "'gpu-box'" in warning and "10.0 s" in warning
    assert "`127.0.0.1 gpu-box`" in warning and "/etc/hosts" in warning


def test_the_lookup_is_timed_once_by_the_clock():
    calls: list[str] = []
    ticks = iter([100.0, 112.5])
    assert timed_lookup(lambda: calls.append("looked up"), lambda: next(ticks)) == 12.5
    assert calls == ["looked up"]


def test_the_check_warns_only_for_a_slow_lookup(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="clip_runner.host_lookup")
    check_host_lookup(lambda: None)
    assert not caplog.records
    check_host_lookup(lambda: time.sleep(SLOW_LOOKUP_S + 0.05))
    [record] = caplog.records
    assert record.getMessage().startswith(WARNING_START)
    assert repr(socket.gethostname()) in record.getMessage()


def test_a_failing_lookup_is_no_error_and_no_warning(caplog: pytest.LogCaptureFixture):
    def refuse() -> None:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    caplog.set_level(logging.WARNING, logger="clip_runner.host_lookup")
    check_host_lookup(refuse)
    assert not caplog.records


def test_the_background_check_returns_at_once_and_does_not_hold_the_exit():
    """A lookup that hangs (a resolver's 30 s) delays neither the caller nor the process's exit."""
    release = threading.Event()
    started = time.monotonic()
    thread = check_host_lookup_in_background(release.wait)
    assert time.monotonic() - started < 0.5
    assert thread.daemon and thread.is_alive()
    release.set()
    thread.join(5)
    assert not thread.is_alive()


# --- a real server on a host whose own name does not resolve -------------------------------------

UNRESOLVED_NAME = "clip-unresolved-host"
SILENT_DNS = "127.0.0.77"  # a loopback address of its own, port 53: needs root


def namespaces_available() -> str | None:
    """Why a server cannot be started in its own mount and UTS namespace here, or None."""
    if os.geteuid() != 0:
        return "needs root (a mount namespace and a DNS server on port 53)"
    for tool in ("unshare", "hostname", "mount"):
        if shutil.which(tool) is None:
            return f"no `{tool}` here"
    trial = subprocess.run(["unshare", "--mount", "--uts", "true"], capture_output=True, timeout=30)
    return None if trial.returncode == 0 else f"unshare refused: {trial.stderr.decode()[:200]}"


@contextmanager
def silent_dns_server() -> Iterator[None]:
    """A DNS server on loopback that reads every query and answers none: what a resolver meets
    where its server cannot be reached (a closed port would refuse at once instead)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((SILENT_DNS, 53))
    stop = threading.Event()

    def swallow() -> None:
        while not stop.is_set():
            if select.select([server], [], [], 0.2)[0]:
                server.recvfrom(4096)

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_a_server_on_a_host_that_cannot_resolve_its_name_says_why_it_started_late(
    tiny_stored_model, bentoml_home, tmp_path: Path, tmp_path_factory
):
    """The supervisor waits out the resolver before it starts any worker; then one API worker
    (of two) times the same lookup and logs the warning with the fix, once, and the server
    serves."""
    unavailable = namespaces_available()
    if unavailable:
        pytest.skip(unavailable)
    resolv_conf = tmp_path / "resolv.conf"  # one try of 2 s per query: a short test
    resolv_conf.write_text(f"nameserver {SILENT_DNS}\noptions timeout:2 attempts:1\n")
    in_namespace = [
        "unshare",
        "--mount",
        "--uts",
        "sh",
        "-c",
        'hostname "$1" && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"',
        "sh",
        UNRESOLVED_NAME,
        str(resolv_conf),
    ]
    with (
        silent_dns_server(),
        serve_tiny(
            tiny_stored_model,
            bentoml_home,
            tmp_path_factory,
            "unresolved-host",
            in_namespace,
            CLIP_API_WORKERS="2",
        ) as server,
    ):
        log = server.wait_for_log(WARNING_START)
        assert httpx.get(f"{server.url}/ping", timeout=5).status_code == 200
    warnings = [line for line in log.splitlines() if WARNING_START in line]
    assert len(warnings) == 1, warnings
    assert f"'{UNRESOLVED_NAME}'" in warnings[0]
    assert f"`127.0.0.1 {UNRESOLVED_NAME}`" in warnings[0]
    seconds = float(warnings[0].split(" took ")[1].split(" s:")[0])
    assert seconds >= SLOW_LOOKUP_S
