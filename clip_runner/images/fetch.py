"""Fetching image URLs that strangers send, without letting them reach what they should not.

Every TCP connection the fetch client makes goes through `GuardedBackend`: it resolves the host
itself, refuses loopback, private, link-local (the cloud metadata address 169.254.169.254
included), multicast and reserved addresses unless an allowlist opens them, and then connects to
the very address it checked. DNS rebinding and redirects (each hop opens its own connection) are
therefore checked too. Responses are streamed with a size cap and a total deadline, and taken
only as sent: a body with a content coding (gzip, which httpx would decode a whole network read
at a time, however large it grows) is refused, since the fetch asks for none.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import socket
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpcore
import httpx

from clip_runner.errors import ImageError, quoted

logger = logging.getLogger(__name__)
# Host names are resolved on threads of their own: a name whose DNS server never answers holds
# a thread for the resolver's whole timeout, and on the loop's default executor, which also
# decodes images (`asyncio.to_thread`), a request of 8 such URLs had stalled every request's
# decode in that worker for about 10 s. Here they can only queue other URLs' lookups.
RESOLVER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="clip-dns")

USER_AGENT = "clip-bentoml/0.1 (zero-shot image classification; image fetcher)"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# NAT64's well-known prefix (RFC 6052): an IPv6 address there is the IPv4 address of its last
# 32 bits, reached through the network's NAT64 gateway. (RFC 8215's local-use 64:ff9b:1::/48 may
# place the IPv4 address elsewhere: it stays refused unless allowed, as reserved.)
NAT64_NETWORK = ipaddress.IPv6Network("64:ff9b::/96")
# Not globally reachable by IANA's registries, but `is_global` in some Python patch releases
# (3.11.7 passes 192.0.0.8 and 3fff::1): refused by name, whatever the interpreter.
NOT_PUBLIC_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in ("192.0.0.0/24", "3fff::/20", "5f00::/16")  # IETF protocol; documentation; SRv6
)


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses image URLs may reach: public ones, plus an explicit allowlist."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_allowlist(cls, entries: Iterable[str]) -> AddressPolicy:
        """Entries are CIDRs / IP addresses (`10.0.0.0/8`, `::1`) or host names (`images.lan`)."""
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def refusal(self, host: str, address: IPAddress) -> str | None:
        """None if connecting to `address` (resolved from `host`) is allowed, else the reason."""
        if host.lower().rstrip(".") in self.allowed_hosts:
            return None
        judged = _through_nat64(address)  # allowed as written or as the IPv4 it stands for
        if any(a in network for a in (address, judged) for network in self.allowed_networks):
            return None
        address = judged
        for embedded in _embedded_ipv4(address):
            if any(embedded in network for network in self.allowed_networks):
                return None
            if not embedded.is_global or embedded.is_multicast:
                return f"{address} embeds the non-public address {embedded}"
        if address.is_multicast:
            return f"{address} is a multicast address"
        if (
            not address.is_global
            or address.is_reserved
            or _site_local(address)
            or any(address in network for network in NOT_PUBLIC_NETWORKS)
        ):
            return f"{address} is not a public address (loopback, private, link-local or reserved)"
        return None


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    if isinstance(address, ipaddress.IPv4Address):
        return []
    found = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
    return [ip for ip in found if ip is not None]


def _through_nat64(address: IPAddress) -> IPAddress:
    """The IPv4 address a NAT64 address stands for (judged as that address: an IPv6-only
    network reaches public IPv4 hosts so), else the address itself."""
    if address in NAT64_NETWORK:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _site_local(address: IPAddress) -> bool:
    """fec0::/10, deprecated but still routed by some networks, and not private to `ipaddress`."""
    return isinstance(address, ipaddress.IPv6Address) and address.is_site_local


def _shown(host: str, reason: str) -> str:
    """Why, as the caller may read it: the address only where the caller wrote it (an IP in the
    URL). A name's private addresses stay in the server's log, or the endpoint would answer
    which internal names exist and where they point."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        logger.info("image URL host %s refused: %s", host, reason)
        return (
            "it resolves to an address that is not public (loopback, private, link-local, "
            "multicast or reserved)"
        )
    return reason


class ForbiddenAddressError(httpcore.ConnectError):
    """Raised instead of connecting to an address the policy refuses."""


# What a response may send before its final status line and headers have been read, the first
# read of its body included. httpcore reads past informational responses (1xx) without limit:
# a host sending `100 Continue` without end, each a complete response that no size cap or
# trickle check saw, held an API worker's event loop for the whole fetch timeout (/ping's
# median 719 ms meanwhile). Real heads are a few kB; h11 bounds one head at 100 kB.
MAX_HEAD_BYTES = 256 * 1024
# The bytes read for the request whose head is awaited (`_after_redirects` sets it around the
# send): the reads happen in the sending task, so they count here and nowhere else.
_HEAD_BYTES: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "head_bytes", default=None
)


class HeadTooLongError(httpcore.ReadError):
    """Raised where a response sends more than MAX_HEAD_BYTES before its final head."""


class HeadBoundedStream(httpcore.AsyncNetworkStream):
    """A connection whose reads count against `_HEAD_BYTES` while a response head is awaited."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self.inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await self.inner.read(max_bytes, timeout)
        if (counted := _HEAD_BYTES.get()) is not None:
            counted[0] += len(data)
            if counted[0] > MAX_HEAD_BYTES:
                raise HeadTooLongError(
                    f"the host sent over {MAX_HEAD_BYTES // 1024} KiB before its response's "
                    "status and headers (endless informational responses?)"
                )
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self.inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def start_tls(self, *args: object, **kwargs: object) -> httpcore.AsyncNetworkStream:
        return HeadBoundedStream(await self.inner.start_tls(*args, **kwargs))

    def get_extra_info(self, info: str) -> object:
        return self.inner.get_extra_info(info)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that resolves, checks, then connects to the checked address."""

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None):
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        infos = await asyncio.get_running_loop().run_in_executor(
            RESOLVER, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        return list(dict.fromkeys(addresses))

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):  # the connect timeout covers the lookup too
                addresses = await self.resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} took over {timeout:g} s") from None
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode (a..b)
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        refusals = [self.policy.refusal(host, address) for address in addresses]
        permitted = [a for a, refusal in zip(addresses, refusals, strict=True) if refusal is None]
        if not permitted:
            raise ForbiddenAddressError(
                f"refusing to connect to {host}: {_shown(host, refusals[0] or '')}"
            )
        last_error: Exception | None = None
        for address in permitted:
            try:
                stream = await self.inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
                return HeadBoundedStream(stream)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        raise last_error or httpcore.ConnectError(f"cannot connect to {host}")

    async def connect_unix_socket(self, *args: object, **kwargs: object) -> None:
        raise ForbiddenAddressError("unix sockets are never used for image URLs")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


# Connections of the image-URL pool; fetches in flight per event loop are held to as many
# (`fetch_url`), so that none waits for a connection on its own deadline.
MAX_CONNECTIONS = 64


def loop_slots(
    registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore], size: int
) -> asyncio.Semaphore:
    """The running event loop's semaphore of `size` in `registry`, made on first use (an asyncio
    semaphore serves one loop)."""
    loop = asyncio.get_running_loop()
    slots = registry.get(loop)
    if slots is None:
        slots = registry[loop] = asyncio.Semaphore(size)
    return slots


_FETCH_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a connection pool whose every connection is policy-checked."""

    def __init__(
        self,
        policy: AddressPolicy,
        max_connections: int = MAX_CONNECTIONS,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        # Built directly rather than via super().__init__, which offers no network_backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=16,
            keepalive_expiry=5.0,
            network_backend=GuardedBackend(policy, network_backend),
        )


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on downloading one image."""

    max_bytes: int
    timeout_s: float
    connect_timeout_s: float = 5.0
    max_redirects: int = 5


def new_fetch_client(
    policy: AddressPolicy,
    limits: FetchLimits,
    network_backend: httpcore.AsyncNetworkBackend | None = None,
) -> httpx.AsyncClient:
    """The shared, guarded connection pool for image URLs (no proxies from the environment).

    `network_backend` is what the guard connects through once an address passes (default: real
    sockets); tests pass one that records instead of connecting to non-loopback addresses.
    """
    return httpx.AsyncClient(
        transport=GuardedTransport(policy, network_backend=network_backend),
        timeout=httpx.Timeout(limits.timeout_s, connect=limits.connect_timeout_s),
        follow_redirects=False,  # followed by `fetch_url`, each redirect's body unread
        headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
        trust_env=False,
    )


async def _after_redirects(
    client: httpx.AsyncClient, url: str, index: int, limits: FetchLimits
) -> httpx.Response:
    """The response `url` ends at, its body not yet read, each redirect's closed unread.

    httpx's own following reads every redirect's whole body first, decoded and with no size
    cap: a 302 carrying 2 kB of gzip within gzip had grown to 1 GiB, one with a 400 MB body
    been read whole, before the redirect was followed."""
    request = client.build_request("GET", url)
    for _ in range(limits.max_redirects + 1):
        counting = _HEAD_BYTES.set([0])
        try:
            response = await client.send(request, stream=True)
        finally:
            _HEAD_BYTES.reset(counting)
        if response.next_request is None:  # not a redirect (the client follows none itself)
            return response
        await response.aclose()
        request = response.next_request
        if request.url.scheme not in ("http", "https"):  # httpcore would follow ws:// as http
            raise ImageError(
                index,
                f"{quoted(url)} redirected to {quoted(str(request.url))}: only http(s) URLs "
                "are fetched",
            )
    raise ImageError(index, f"{quoted(url)} redirected more than {limits.max_redirects} times")


# Each piece of a body (an HTTP chunk, or a network read) is parsed in Python on the event loop:
# a host sending one byte per chunk had cost an API worker a core for the whole fetch timeout,
# and /ping up to 2 s. Every TRICKLE_PIECES pieces the body must average TRICKLE_BYTES a piece;
# a slow host sending whole TCP segments (1,400 bytes or so) passes.
TRICKLE_PIECES = 4096
TRICKLE_BYTES = 512


async def fetch_url(client: httpx.AsyncClient, url: str, index: int, limits: FetchLimits) -> bytes:
    """Download an image with a total deadline, a status check, and a size cap while streaming.
    A connection slot first, before the deadline starts: 80 fetches at once, each answered in
    0.9 s, had those past the pool's 64th time out at 1.5 s waiting for a connection."""
    async with loop_slots(_FETCH_SLOTS, MAX_CONNECTIONS):
        return await _download(client, url, index, limits)


async def _download(client: httpx.AsyncClient, url: str, index: int, limits: FetchLimits) -> bytes:
    """`fetch_url`'s download, within `limits.timeout_s`."""
    shown = quoted(url)
    too_large = f"image at {shown} is larger than the {limits.max_bytes}-byte limit"
    try:
        async with asyncio.timeout(limits.timeout_s):
            response = await _after_redirects(client, url, index, limits)
            try:
                if not response.is_success:
                    raise ImageError(
                        index, f"fetching {shown} returned HTTP {response.status_code}"
                    )
                coding = response.headers.get("content-encoding", "").strip().lower()
                if coding not in ("", "identity"):  # asked for none: a gzip bomb is not decoded
                    raise ImageError(
                        index,
                        f"{shown} was sent with Content-Encoding {quoted(coding)}; image URLs "
                        "must be served as they are stored (identity)",
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limits.max_bytes:
                    raise ImageError(index, too_large)
                body = bytearray()
                pieces = 0
                async for chunk in response.aiter_raw():
                    body += chunk
                    pieces += 1
                    if len(body) > limits.max_bytes:
                        raise ImageError(index, too_large)
                    if pieces % TRICKLE_PIECES == 0 and len(body) < pieces * TRICKLE_BYTES:
                        raise ImageError(
                            index,
                            f"{shown} sent its body in {pieces:,} pieces of under "
                            f"{TRICKLE_BYTES} bytes on average",
                        )
            finally:
                await response.aclose()
    except TimeoutError:
        raise ImageError(
            index, f"fetching {shown} timed out after {limits.timeout_s:g} s"
        ) from None
    except (httpx.InvalidURL, UnicodeError) as exc:
        # Neither is an HTTPError: a URL too long, with a NUL, a bad port or a host name IDNA
        # cannot read (httpx lets the idna package's own error through for `xn--`).
        raise ImageError(
            index, f"could not fetch {shown}: invalid URL ({quoted(str(exc))})"
        ) from None
    except httpx.HTTPError as exc:
        if isinstance(exc.__cause__, ForbiddenAddressError):
            raise ImageError(
                index,
                f"{quoted(str(exc.__cause__))} (set CLIP_FETCH_ALLOW to allow private addresses)",
                "forbidden_url",
            ) from None
        reason = quoted(str(exc)) or type(exc).__name__
        raise ImageError(index, f"could not fetch {shown}: {reason}") from None
    if not body:
        raise ImageError(index, f"{shown} returned an empty body")
    return bytes(body)
