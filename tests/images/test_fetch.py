"""URL fetching under attack: SSRF attempts, redirects, slow and endless hosts, size caps.

Forbidden loopback targets are real listeners on 127.0.0.1 / ::1 that count connections (they
must see none). Forbidden non-loopback targets (10.x, 169.254.169.254, ...) are never dialled,
even if the guard broke: the backend behind the guard there only records what it was asked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time

import httpcore
import pytest

from clip_runner.errors import RequestError
from clip_runner.images.fetch import AddressPolicy, FetchLimits, fetch_url, new_fetch_client
from clip_runner.images.loading import ImageGeometry, ImageLimits, load_images
from tests.helpers import PUBLIC_HOST, ConnectionCounter, photo_like

PUBLIC_ONLY = AddressPolicy.from_allowlist([f"{PUBLIC_HOST}/32"])
LIMITS = FetchLimits(max_bytes=1_000_000, timeout_s=2, connect_timeout_s=1)


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records connection attempts and makes none."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int]] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.attempts.append((host, port))
        raise httpcore.ConnectError("recording backend: no connection made")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def fetch(url: str, policy=PUBLIC_ONLY, limits=LIMITS, backend=None) -> bytes:
    async def go():
        async with new_fetch_client(policy, limits, backend) as client:
            return await fetch_url(client, url, 0, limits)

    return asyncio.run(go())


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.9.9.9",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.0.10",
        "169.254.169.254",
        "fe80::1",
        "fc00::1",
        "224.0.0.1",
        "ff02::1",
        "0.0.0.0",
        "100.64.0.1",
        "240.0.0.1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::1",
        "64:ff9b::a9fe:a9fe",  # NAT64 (an IPv6-only VPC's gateway) to the metadata address
        "64:ff9b:1::a00:5",  # local-use NAT64 (its IPv4 may sit anywhere): reserved
        "64:ff9b:1:a00:0:500:808:808",  # ... here 10.0.0.5 in a /48 layout, not 8.8.8.8
        "::7f00:1",  # IPv4-compatible ::127.0.0.1
        "::ffff:0:7f00:1",  # IPv4-translated
        "fec0::1",  # site-local
        "192.0.0.8",  # IETF protocol assignments (is_global in Python 3.11.7)
        "3fff::1",  # documentation (RFC 9637)
        "5f00::1",  # SRv6 SIDs (RFC 9602)
    ],
)
def test_policy_refuses_non_public_addresses(address):
    assert AddressPolicy().refusal("example.com", ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "64:ff9b::808:808"],  # NAT64 to 8.8.8.8
)
def test_policy_allows_public_addresses(address):
    assert AddressPolicy().refusal("example.com", ipaddress.ip_address(address)) is None


def test_allowlist_opens_nat64_addresses_as_written_or_as_their_ipv4():
    for entry in ("64:ff9b::/96", "169.254.169.254"):
        policy = AddressPolicy.from_allowlist([entry])
        assert policy.refusal("x", ipaddress.ip_address("64:ff9b::a9fe:a9fe")) is None


def test_allowlist_opens_networks_and_host_names():
    policy = AddressPolicy.from_allowlist(["10.0.0.0/8", " images.lan. ", "::1", ""])
    assert policy.refusal("x", ipaddress.ip_address("10.20.30.40")) is None
    assert policy.refusal("x", ipaddress.ip_address("::1")) is None
    assert policy.refusal("IMAGES.LAN", ipaddress.ip_address("192.168.1.1")) is None
    assert policy.refusal("x", ipaddress.ip_address("192.168.1.1")) is not None


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/cat.png",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fd00::1]/cat.png",
        "http://192.168.1.1:8080/cat.png",
        "https://172.31.255.255/cat.png",
    ],
)
def test_private_and_metadata_urls_are_refused_without_dialling(url):
    recorder = RecordingBackend()
    with pytest.raises(RequestError) as raised:
        fetch(url, backend=recorder)
    assert raised.value.error_type == "forbidden_url" and raised.value.index == 0
    assert "CLIP_FETCH_ALLOW" in raised.value.message
    assert recorder.attempts == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://a" * 10_000, "invalid URL (URL too long)"),  # over httpx's 65,536 characters
        ("http://a\x00b/cat.png", "invalid URL (Invalid non-printable ASCII character"),
        ("http://[::1/cat.png", "invalid URL (Invalid port"),
        ("http://\u202e/cat.png", "invalid URL (Invalid IDNA hostname"),
        ("http://xn--/cat.png", "invalid URL (Malformed A-label"),  # idna's own error
        # Python's IDNA codec words these "label empty or too long" (3.11 after a prefix)
        ("http://a..b/cat.png", "cannot resolve a..b: "),
        (f"http://{'a' * 64}.example/cat.png", "label empty or too long"),
    ],
    ids=["too long", "NUL", "bad port", "bad IDNA name", "empty A-label", "empty label", "long"],
)
def test_urls_that_cannot_be_fetched_are_a_422_naming_the_image_without_dialling(url, reason):
    """Not one of them an HTTP error of httpx's: each was a 500 until they were caught."""
    recorder = RecordingBackend()
    with pytest.raises(RequestError) as raised:
        fetch(url, backend=recorder)
    error = raised.value
    assert (error.status, error.error_type, error.index) == (422, "invalid_image", 0)
    assert error.message.startswith("images[0]: could not fetch http://")
    assert reason in error.message
    assert len(error.message) < 500  # the 80,000-character URL is quoted by its start
    assert recorder.attempts == []


def test_a_name_whose_dns_never_answers_holds_neither_the_fetch_nor_the_decoding_threads(
    monkeypatch,
):
    """Eight URLs on names whose DNS server is silent (the resolver waits out its timeouts):
    each fetch ends at the connect timeout, and meanwhile the loop's default executor, which
    decodes every request's images, stays free (the lookups have threads of their own)."""
    real_getaddrinfo = socket.getaddrinfo
    silent_dns = threading.Event()
    lookup_threads: list[str] = []

    def getaddrinfo(host, *args, **kwargs):
        if str(host).endswith(".slow.test"):
            lookup_threads.append(threading.current_thread().name)
            silent_dns.wait(5)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    limits = FetchLimits(max_bytes=1_000_000, timeout_s=3, connect_timeout_s=0.5)

    async def scenario() -> tuple[float, list]:
        async with new_fetch_client(PUBLIC_ONLY, limits) as client:
            urls = [f"http://host{i}.slow.test/cat.png" for i in range(8)]
            fetches = [asyncio.ensure_future(fetch_url(client, url, 0, limits)) for url in urls]
            await asyncio.sleep(0.1)  # every lookup under way
            started = time.monotonic()
            await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.01) for _ in range(12)))
            decode_threads_free_after = time.monotonic() - started
            return decode_threads_free_after, await asyncio.gather(*fetches, return_exceptions=True)

    try:
        free_after, outcomes = asyncio.run(scenario())
    finally:
        silent_dns.set()
    assert free_after < 1.0
    # Threads of their own: on a machine of many cores the default executor alone would have
    # threads to spare for eight lookups, and the check above would pass without them.
    assert len(lookup_threads) == 8 and all(name.startswith("clip-dns") for name in lookup_threads)
    for outcome in outcomes:
        assert isinstance(outcome, RequestError) and outcome.error_type == "invalid_image"
        assert "resolving host" in outcome.message and "took over 0.5 s" in outcome.message


@pytest.fixture()
def loopback_v4():
    counter = ConnectionCounter("127.0.0.1")
    yield counter
    counter.close()


@pytest.fixture()
def loopback_v6():
    counter = ConnectionCounter("::1")
    yield counter
    counter.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LocalHost", "2130706433", "0x7f.1"])
def test_loopback_urls_are_refused_without_a_connection(loopback_v4, host):
    with pytest.raises(RequestError) as raised:
        fetch(f"http://{host}:{loopback_v4.port}/secret")
    assert raised.value.error_type == "forbidden_url"
    if host == "127.0.0.1":
        assert "127.0.0.1 is not a public address" in raised.value.message
    else:  # resolved: where a name points stays on the server (no DNS oracle)
        assert "127.0.0.1" not in raised.value.message
        assert (
            f"{host.lower()}: it resolves to an address that is not public" in raised.value.message
        )
    time.sleep(0.3)
    assert loopback_v4.accepted == 0


def test_ipv6_loopback_is_refused_without_a_connection(loopback_v6):
    with pytest.raises(RequestError, match="forbidden|refusing"):
        fetch(f"http://[::1]:{loopback_v6.port}/secret")
    time.sleep(0.3)
    assert loopback_v6.accepted == 0


def test_public_url_redirecting_to_loopback_is_refused(loopback_v4, image_host_server):
    target = f"http://127.0.0.1:{loopback_v4.port}/secret"
    with pytest.raises(RequestError) as raised:
        fetch(f"{image_host_server.url}/redirect?to={target}")
    assert raised.value.error_type == "forbidden_url"
    assert f"/redirect?to={target}" in image_host_server.access_log  # the first hop happened
    time.sleep(0.3)
    assert loopback_v4.accepted == 0


@pytest.mark.parametrize("target", ["file:///etc/passwd", "gopher://127.0.0.1:70/_x"])
def test_redirects_to_other_schemes_are_refused(image_host_server, target):
    with pytest.raises(RequestError, match="only http\\(s\\) URLs are fetched"):
        fetch(f"{image_host_server.url}/redirect?to={target}")


def test_a_redirects_body_is_not_read(image_dir, image_host_server):
    """httpx's own following read (and decoded, uncapped) each redirect's body: a 302 carrying a
    gzip bomb grew to its full size before the redirect was followed. This one's body is no
    gzip at all, so reading it would fail the fetch."""
    photo_like(64, 48, seed=2).save(image_dir / "after-redirect.png")
    target = f"{image_host_server.url}/after-redirect.png"
    assert fetch(f"{image_host_server.url}/redirect-gzip?to={target}")[:4] == b"\x89PNG"


def test_redirect_loops_stop_at_the_limit(image_host_server):
    before = image_host_server.access_log.count("/loop")
    with pytest.raises(RequestError, match="redirected more than 5 times"):
        fetch(f"{image_host_server.url}/loop")
    assert image_host_server.access_log.count("/loop") - before == 6


def test_a_host_that_never_answers_is_cut_off_at_the_deadline(image_host_server):
    with pytest.raises(RequestError, match="timed out after 2 s"):
        fetch(f"{image_host_server.url}/hang")


def test_an_endless_body_is_cut_off_at_the_size_cap(image_host_server):
    with pytest.raises(RequestError, match="larger than the 1000000-byte limit"):
        fetch(f"{image_host_server.url}/endless")


def test_a_body_trickled_in_tiny_chunks_is_refused_early(image_host_server):
    """Each HTTP chunk is parsed in Python on the event loop: a host sending one byte per chunk
    had cost the API worker a core for the whole fetch timeout, and /ping its 2 s."""
    with pytest.raises(RequestError, match=r"/tiny-chunks sent its body in 4,096 pieces"):
        fetch(f"{image_host_server.url}/tiny-chunks")  # not the 2-s deadline's message


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_a_redirect_to_another_scheme_is_not_followed(image_host_server, scheme):
    """httpcore takes ws:// and wss:// for http(s) and would fetch them; only http(s) is."""
    target = image_host_server.url.replace("http", scheme, 1) + "/photo.png"
    with pytest.raises(RequestError, match="only http\\(s\\) URLs are fetched"):
        fetch(f"{image_host_server.url}/redirect?to={target}")
    assert not [path for path in image_host_server.access_log if path == "/photo.png"]


def test_endless_informational_responses_are_refused_early(image_host_server):
    """httpcore reads past `100 Continue`s without limit, each a whole response that neither
    the size cap nor the trickle check saw: a host sending them without end had held the API
    worker's event loop for the whole fetch timeout."""
    with pytest.raises(RequestError, match="before its response's status and headers"):
        fetch(f"{image_host_server.url}/informational-flood")  # not the 2-s deadline's message


def test_a_body_with_a_content_coding_is_refused_not_decoded(image_host_server):
    """The fetch asks for none (identity); httpx would decode gzip a whole network read at a
    time before the size cap saw it, and 2 kB of gzip within gzip is a gigabyte."""
    with pytest.raises(RequestError) as raised:
        fetch(f"{image_host_server.url}/gzip")
    assert raised.value.error_type == "invalid_image"
    assert "/gzip was sent with Content-Encoding gzip, gzip; image URLs must be" in (
        raised.value.message
    )


def test_declared_oversize_is_refused_before_reading(image_dir, image_host_server):
    (image_dir / "large.bin").write_bytes(b"\0" * 2_000_000)
    with pytest.raises(RequestError, match="larger than the 1000000-byte limit"):
        fetch(f"{image_host_server.url}/large.bin")


@pytest.mark.parametrize("status", [404, 500, 503])
def test_non_2xx_statuses_are_named(image_host_server, status):
    with pytest.raises(RequestError, match=f"returned HTTP {status}"):
        fetch(f"{image_host_server.url}/status/{status}")


def test_a_good_image_from_an_allowed_host_is_fetched(image_dir, image_host_server):
    photo_like(64, 48, seed=1).save(image_dir / "good.png")
    assert fetch(f"{image_host_server.url}/good.png")[:4] == b"\x89PNG"


def hang_count(host) -> int:
    return sum(path.startswith("/hang") for path in host.access_log)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_fetches_within_a_request_are_bounded(image_host_server, concurrency):
    limits = ImageLimits(FetchLimits(1_000_000, 1, 1), 50_000_000, fetch_concurrency=concurrency)
    before = hang_count(image_host_server)

    async def go():
        async with new_fetch_client(PUBLIC_ONLY, limits.fetch) as client:
            urls = [f"{image_host_server.url}/hang?{i}" for i in range(4)]
            return await load_images(urls, client, ImageGeometry(224, 224, 224), limits)

    with pytest.raises(RequestError, match="timed out"):
        asyncio.run(go())
    time.sleep(0.2)
    # the first timeout fails the request and cancels the rest: only `concurrency` ever started
    assert hang_count(image_host_server) - before == concurrency


def test_waiting_for_a_pooled_connection_does_not_count_against_the_deadline(
    image_dir, image_host_server
):
    """More fetches at once than the pool's connections, each answered well within the
    deadline: those past the 64th had timed out waiting for a connection (the S3 reads' twin)."""
    photo_like(8, 8, seed=1).save(image_dir / "pooled.png")
    limits = FetchLimits(max_bytes=1_000_000, timeout_s=1.5, connect_timeout_s=1)
    fetches = 80

    async def fetch_all() -> list[bytes]:
        async with new_fetch_client(PUBLIC_ONLY, limits) as client:
            urls = [
                f"{image_host_server.url}/slow?s=0.9&to=/pooled.png?n={i}" for i in range(fetches)
            ]
            return await asyncio.gather(
                *(fetch_url(client, url, i, limits) for i, url in enumerate(urls))
            )

    assert len(asyncio.run(fetch_all())) == fetches
