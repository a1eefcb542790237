"""Open Inference Protocol v2 (KServe / MLServer / Triton) REST client over httpx.

URI: ``v2+http://host:port/models/NAME`` (or ``v2+https://...``; a path prefix before /models/ is kept, for
gateways that mount the server under a sub-path). Queries go to ``POST {base}/v2/models/{NAME}/infer``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np

from .base import V2_DTYPES, BlackBoxUnavailable, InputSpec
from .httpio import ACCEPT_ENCODING, ResponseTooLarge, deadline, deadline_transport, read_capped
from .remote import (
    FatalError,
    RemoteBlackBox,
    ResponseTooLargeError,
    RetryableError,
    headers_from_env,
    parse_retry_after,
)

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# The endpoint refused the request's content: asking again with the same image will not help (once a row is refused
# alone: the engine splits a refused request first). 413 is not here: a body-size limit belongs to the deployment,
# not to one image of a fixed size.
DATA_STATUS = frozenset({400, 415, 422})
# How much of an error body is read for its message.
_ERROR_BODY_BYTES = 4096
_NP_TO_V2 = {v: k for k, v in V2_DTYPES.items()}


def encode_v2_request(x: np.ndarray, spec: InputSpec, request_id: str) -> dict:
    """A v2 inference request body for one batch (row-major flat data; the shape covers the whole batch)."""
    datatype = _NP_TO_V2.get(x.dtype, spec.datatype)
    return {"id": request_id,
            "inputs": [{"name": spec.input_name, "shape": list(x.shape), "datatype": datatype,
                        "data": x.ravel().tolist()}]}


def decode_v2_response(body: object) -> np.ndarray:
    """The first output tensor of a v2 response as an array; ValueError if the body is not a v2 response."""
    if not isinstance(body, dict):
        raise ValueError("response is not a JSON object")
    outputs = body.get("outputs")
    if not outputs or not isinstance(outputs, list) or not isinstance(outputs[0], dict):
        err = body.get("error")
        # not cut here: the caller redacts first, then cuts
        raise ValueError(f"no outputs in response{f' (error: {err})' if err else ''}")
    first = outputs[0]
    shape, data, datatype = first.get("shape"), first.get("data"), first.get("datatype", "FP32")
    if shape is None or data is None:
        raise ValueError("first output lacks 'shape' or 'data'")
    if datatype == "BYTES":
        raise ValueError("first output is BYTES, expected a numeric tensor")
    dtype = V2_DTYPES.get(datatype, np.dtype(np.float64))
    if datatype == "BOOL":
        dtype = np.dtype(bool)
    arr = np.asarray(data, dtype=dtype)
    try:
        return arr.reshape([int(s) for s in shape])
    except ValueError as e:
        raise ValueError(f"output data of size {arr.size} does not fit its shape {shape}") from e


def parse_v2_uri(uri: str) -> tuple[str, str]:
    """'v2+http://h:p/prefix/models/NAME' -> ('http://h:p/prefix', 'NAME')."""
    if not uri.startswith(("v2+http://", "v2+https://")):
        raise ValueError("a v2 URI looks like v2+http://host:port/models/NAME")
    parts = urlsplit(uri[3:])
    if parts.username or parts.password:
        # the message must not echo the URI: it holds the credential
        raise ValueError("credentials in a v2 URI are not supported: use auth_env= or header_env=")
    path = parts.path.rstrip("/")
    prefix, sep, name = path.rpartition("/models/")
    if not sep or not name or "/" in name:
        raise ValueError("a v2 URI looks like v2+http://host:port/models/NAME (model name missing)")
    return urlunsplit((parts.scheme, parts.netloc, prefix, "", "")), name


def _public_url(url: str) -> str:
    """URL without user:password, for messages and repr."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class V2BlackBox(RemoteBlackBox):
    def __init__(self, uri: str, spec: InputSpec | None = None, *, auth_env: str | None = None,
                 header_env: Mapping[str, str] | None = None, verify: bool | str = True,
                 check_timeout_s: float = 5.0, **options) -> None:
        base, name = parse_v2_uri(uri)
        headers, secrets = headers_from_env(auth_env, header_env)
        super().__init__(spec, secrets=secrets, **options)
        self._credential_envs = ([auth_env] if auth_env else []) + list((header_env or {}).values())
        self.base_url = base
        self.model_name = name
        self.check_timeout_s = check_timeout_s
        self._infer_url = f"{base}/v2/models/{name}/infer"
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        self._client = httpx.Client(
            headers={"Content-Type": "application/json", "Accept-Encoding": ACCEPT_ENCODING, **headers},
            timeout=httpx.Timeout(self.timeout_s), transport=deadline_transport(verify, limits),
        )

    def _target(self) -> str:
        return f"{_public_url(self.base_url)}/v2/models/{self.model_name}"

    def _credentials(self) -> str:
        envs = ", ".join(f"${e}" for e in self._credential_envs)
        return f"the credentials in {envs}" if envs else "the request (no credentials configured: auth_env?)"

    def _send(self, x: np.ndarray, request_id: str) -> np.ndarray:
        body = json.dumps(encode_v2_request(x, self.spec, request_id)).encode()
        try:
            # timeout_s is the whole request's deadline (connect, send, headers and body), not a per-read timeout
            with deadline(self.timeout_s), self._client.stream("POST", self._infer_url, content=body) as r:
                if r.status_code in RETRY_STATUS:
                    raise RetryableError(f"http {r.status_code}",
                                         parse_retry_after(r.headers.get("Retry-After"), self.max_retry_after_s))
                if r.status_code != 200:
                    text = self._error_text(r)
                    raise FatalError(f"http {r.status_code}: {self._redact(text)}",
                                     retryable=r.status_code not in DATA_STATUS, status=r.status_code)
                raw = read_capped(r.iter_raw(), r.headers.get("Content-Encoding"), self.max_response_bytes)
        except httpx.TimeoutException as e:
            raise RetryableError("timeout") from e
        except httpx.ConnectError as e:
            raise RetryableError("connect error") from e
        except (httpx.NetworkError, httpx.RemoteProtocolError) as e:
            # a reset or a dropped connection mid-request: the server may be restarting, worth another try
            raise RetryableError("connection reset") from e
        except ResponseTooLarge as e:
            raise ResponseTooLargeError(self.max_response_bytes) from e
        except ValueError as e:  # an encoding we do not inflate, or a corrupt one
            raise FatalError(f"bad response: {e}") from e
        try:
            return decode_v2_response(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FatalError("bad response: body is not JSON") from e
        except ValueError as e:
            raise FatalError(f"bad response: {e}") from e

    def _error_text(self, r: httpx.Response) -> str:
        """The start of an error body, for the row's reason; never more than a few KiB read."""
        try:
            raw = read_capped(r.iter_raw(), r.headers.get("Content-Encoding"), _ERROR_BODY_BYTES, truncate=True)
        except ValueError:
            return "(unreadable body)"
        return raw.decode("utf-8", "replace")

    def check(self) -> None:
        where = self._target()
        for url, what in ((f"{self.base_url}/v2/health/ready", "server"),
                          (f"{self.base_url}/v2/models/{self.model_name}/ready", f"model {self.model_name!r}")):
            try:
                with deadline(self.check_timeout_s):  # a trickled ready answer must not hold the preflight
                    r = self._client.get(url, timeout=self.check_timeout_s)
            except httpx.TimeoutException:
                raise BlackBoxUnavailable(f"{where}: no answer within {self.check_timeout_s}s ({what} ready check)"
                                          ) from None
            except httpx.HTTPError as e:
                # `from None`: the httpx exception carries the request, whose headers hold the token
                raise BlackBoxUnavailable(f"{where}: cannot connect ({type(e).__name__}); is the server running?"
                                          ) from None
            if r.status_code != 200:
                raise BlackBoxUnavailable(f"{where}: {what} not ready (http {r.status_code})")

    def close(self) -> None:
        super().close()
        self._client.close()
