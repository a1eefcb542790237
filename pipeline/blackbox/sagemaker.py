"""Amazon SageMaker real-time endpoint client: ``sagemaker:ENDPOINT`` -> sagemaker-runtime InvokeEndpoint.

The body is a v2 inference request (JSON), which is what MLServer / Triton / KServe containers on SageMaker accept;
the response is read as a v2 response. AWS credentials come from boto3's usual chain (env, profile, role), never
from options, so nothing secret passes through this object.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from .base import BlackBoxUnavailable, InputSpec
from .remote import FatalError, RemoteBlackBox, ResponseTooLargeError, RetryableError
from .v2 import DATA_STATUS, RETRY_STATUS, decode_v2_response, encode_v2_request

_RETRY_CODES = frozenset({"ThrottlingException", "ServiceUnavailable", "InternalFailure", "InternalDependencyException",
                          "ModelNotReadyException", "RequestTimeout"})


class SageMakerBlackBox(RemoteBlackBox):
    def __init__(self, endpoint: str, spec: InputSpec | None = None, *, region_name: str | None = None,
                 endpoint_url: str | None = None, target_model: str | None = None, target_variant: str | None = None,
                 inference_component: str | None = None, client: object | None = None,
                 control_client: object | None = None, **options) -> None:
        if not endpoint:
            raise ValueError("a SageMaker URI looks like sagemaker:ENDPOINT-NAME")
        super().__init__(spec, **options)
        self.endpoint = endpoint
        self._extra = {k: v for k, v in (("TargetModel", target_model), ("TargetVariant", target_variant),
                                         ("InferenceComponentName", inference_component)) if v}
        self._region = region_name
        self._endpoint_url = endpoint_url
        # injected clients let tests attach botocore's Stubber; otherwise clients are built lazily (no AWS call here)
        self._client = client
        self._control = control_client
        self._client_lock = threading.Lock()
        # botocore bounds each socket read, not the request: calls run here so that the caller can stop waiting at
        # the deadline. A call past it keeps its thread until botocore gives up; the pool's size bounds how many.
        self._calls = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="sagemaker-call")

    def _boto_client(self, service: str) -> object:
        import boto3
        from botocore.config import Config

        # botocore's own retries are off: ours count attempts, honour the budget and record per-row errors
        cfg = Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=self.timeout_s,
                     connect_timeout=min(self.timeout_s, 10.0), max_pool_connections=self.max_concurrency)
        # a private Session: boto3's default session is not safe to build clients from in several threads
        return boto3.session.Session().client(service, region_name=self._region, endpoint_url=self._endpoint_url,
                                              config=cfg)

    @property
    def client(self) -> object:
        # built on first use by whichever worker thread gets there first; clients themselves are thread-safe
        with self._client_lock:
            if self._client is None:
                self._client = self._boto_client("sagemaker-runtime")
            return self._client

    def _target(self) -> str:
        return f"sagemaker:{self.endpoint}"

    def _credentials(self) -> str:
        return "the AWS credentials of this process (AWS_ACCESS_KEY_ID / AWS_PROFILE / role)"

    def _send(self, x: np.ndarray, request_id: str) -> np.ndarray:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        body = json.dumps(encode_v2_request(x, self.spec, request_id)).encode()

        def call() -> bytes:
            resp = self.client.invoke_endpoint(EndpointName=self.endpoint, ContentType="application/json",
                                               Accept="application/json", Body=body, **self._extra)
            # one byte past the cap tells a bomb from an answer without holding the bomb
            return resp["Body"].read(self.max_response_bytes + 1)

        future = self._calls.submit(call)
        try:
            raw = future.result(timeout=self.timeout_s)
        except FutureTimeout as e:
            # still queued behind other calls: it must not go out (and be billed) after its retry has
            future.cancel()
            raise RetryableError("timeout") from e
        except (ReadTimeoutError, ConnectTimeoutError) as e:
            raise RetryableError("timeout") from e
        except EndpointConnectionError as e:
            raise RetryableError("connect error") from e
        except ConnectionClosedError as e:
            raise RetryableError("connection reset") from e
        except ClientError as e:
            err = e.response.get("Error", {})
            code = err.get("Code", "?")
            status = e.response.get("OriginalStatusCode") or e.response.get("ResponseMetadata", {}).get(
                "HTTPStatusCode", 0)
            reason = f"sagemaker {code} (http {status})"
            if code in _RETRY_CODES or status in RETRY_STATUS:
                raise RetryableError(reason) from e
            # Only the model container's own 4xx (ModelError, its status in OriginalStatusCode) refuses the data;
            # SageMaker's 400s are about the call: AccessDenied, an expired token, an endpoint being replaced, a
            # payload over the service's limit. Not cut here: the engine redacts first, then cuts.
            data = code == "ModelError" and status in DATA_STATUS
            raise FatalError(f"{reason}: {err.get('Message', '')}", retryable=not data, status=status or None) from e
        if len(raw) > self.max_response_bytes:
            raise ResponseTooLargeError(self.max_response_bytes)
        try:
            return decode_v2_response(json.loads(raw))
        except json.JSONDecodeError as e:
            raise FatalError("bad response: body is not JSON") from e
        except ValueError as e:
            raise FatalError(f"bad response: {e}") from e

    def close(self) -> None:
        super().close()
        self._calls.shutdown(wait=False, cancel_futures=True)  # a call past its deadline is not waited for

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        with self._client_lock:
            if self._control is None:
                self._control = self._boto_client("sagemaker")
        try:
            desc = self._control.describe_endpoint(EndpointName=self.endpoint)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            raise BlackBoxUnavailable(f"{self._target()}: describe_endpoint failed ({code})") from None
        except BotoCoreError as e:
            raise BlackBoxUnavailable(f"{self._target()}: cannot reach SageMaker ({type(e).__name__})") from None
        status = desc.get("EndpointStatus")
        if status != "InService":
            raise BlackBoxUnavailable(f"{self._target()}: endpoint status is {status}, not InService")
