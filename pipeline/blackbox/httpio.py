"""HTTP plumbing for remote clients: a whole-request deadline and a response body read with a size cap.

httpx's timeouts bound each socket operation, not the request: a server that trickles one byte a second holds a
client with ``timeout_s: 1`` for as long as it likes. Here every socket read, write and connect of a request is
bounded by what is left of that request's deadline, so the request as a whole ends at the deadline. The deadline
is per thread (sync httpx runs a request on the calling thread), set around each request by :func:`deadline`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import zlib
from collections.abc import Iterable, Iterator

import httpcore
import httpx

_local = threading.local()
# Content encodings read here; others are refused rather than handed to a decoder we do not bound.
ACCEPT_ENCODING = "gzip, deflate"


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Every socket operation of this thread inside the block ends by ``seconds`` from now."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.deadline = previous


def _left(timeout: float | None, exc: type[Exception]) -> float | None:
    end = getattr(_local, "deadline", None)
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise exc("request deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):  # noqa: ANN001, ANN201 - httpcore's API
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> object:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):  # noqa: ANN001, ANN201
        return _DeadlineStream(self._inner.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                                       local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):  # noqa: ANN001, ANN201
        return _DeadlineStream(self._inner.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def deadline_transport(verify: bool | str, limits: httpx.Limits) -> httpx.HTTPTransport:
    """An httpx transport whose sockets honour :func:`deadline`."""
    transport = httpx.HTTPTransport(verify=verify, limits=limits)
    # httpx takes no network backend of its own; its pool is rebuilt with the same settings plus ours.
    old = transport._pool
    transport._pool = httpcore.ConnectionPool(
        ssl_context=old._ssl_context, max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        network_backend=_DeadlineBackend())
    return transport


class ResponseTooLarge(ValueError):
    """The body passed the cap (after inflation)."""


def read_capped(chunks: Iterable[bytes], content_encoding: str | None, cap: int, *, truncate: bool = False) -> bytes:
    """Raw body chunks -> the decoded body, never holding more than ``cap`` bytes of it: gzip and deflate are
    inflated here with a bound on each step's output, so 0.3 MB on the wire cannot become 446 MB in memory.
    Past the cap: ResponseTooLarge, or with ``truncate`` the first ``cap`` bytes."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        inflater = None
    elif encoding in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib-wrapped, as RFC 9110 means by deflate
    else:
        raise ValueError(f"unsupported content-encoding {encoding!r}")
    out = bytearray()
    for chunk in chunks:
        data = chunk
        while data:
            if inflater is None:
                piece, data = data, b""
            else:
                try:
                    piece = inflater.decompress(data, cap + 1 - len(out))
                except zlib.error as e:
                    raise ValueError(f"corrupt {encoding} body") from e
                data = inflater.unconsumed_tail
            out += piece
            if len(out) > cap:
                if truncate:
                    return bytes(out[:cap])
                raise ResponseTooLarge(f"response larger than {cap} bytes")
            if inflater is not None and not piece:
                break
    return bytes(out)
