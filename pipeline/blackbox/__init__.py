"""Black-box classifiers: a local ONNX file, an Open Inference Protocol v2 endpoint, or a SageMaker endpoint.

    bb = open_blackbox("v2+http://127.0.0.1:8080/models/victim", InputSpec(), auth_env="BB_TOKEN")
    bb.check()                      # fail fast before a job: reachable and ready
    bb.probe()                      # one 1-image query with the real credentials, outside the budget
    pred = bb.predict(images_u8)    # labels (-1 on failure), scores or None, per-row errors
"""

from __future__ import annotations

from .base import (
    BUDGET_EXHAUSTED,
    MAX_LABEL,
    BlackBox,
    BlackBoxUnavailable,
    InputSpec,
    Prediction,
    parse_output,
    to_model_input,
)

__all__ = [
    "BUDGET_EXHAUSTED", "MAX_LABEL", "BlackBox", "BlackBoxUnavailable", "InputSpec", "Prediction", "open_blackbox",
    "parse_output", "to_model_input",
]


def open_blackbox(uri: str, spec: InputSpec | None = None, **options) -> BlackBox:
    """``onnx:path/model.onnx`` | ``v2+http(s)://host:port/models/NAME`` | ``sagemaker:ENDPOINT``.

    Options common to all: max_batch_size, query_budget. Remote clients also take max_concurrency, timeout_s,
    retries, backoff_s, max_backoff_s, max_retry_after_s, rate_limit_qps; v2 takes auth_env, header_env, verify,
    check_timeout_s; SageMaker takes region_name, endpoint_url, target_model, target_variant, inference_component.
    The ONNX client ignores remote-only options so one config can switch between a local file and an endpoint.
    """
    bb = _open(uri, spec, **options)
    # keep only picklable, secret-free options for the reopen recipe (injected test clients are neither)
    if not any(k in options for k in ("client", "control_client")):
        bb._reopen = (uri, spec, dict(options))
    return bb


def _reopen_blackbox(uri: str, spec: InputSpec | None, options: dict) -> BlackBox:
    return open_blackbox(uri, spec, **options)


def _open(uri: str, spec: InputSpec | None, **options) -> BlackBox:
    if uri.startswith("onnx:"):
        from .onnx import OnnxBlackBox

        return OnnxBlackBox(uri[len("onnx:"):], spec, **options)
    if uri.startswith(("v2+http://", "v2+https://")):
        from .v2 import V2BlackBox

        return V2BlackBox(uri, spec, **options)
    if uri.startswith("sagemaker:"):
        from .sagemaker import SageMakerBlackBox

        return SageMakerBlackBox(uri[len("sagemaker:"):], spec, **options)
    # the scheme only: a URI may carry a credential someone put there by mistake
    scheme = uri.split(":", 1)[0] if ":" in uri else "(none)"
    raise ValueError(f"unknown black-box URI scheme {scheme!r}; use onnx:, v2+http(s):// or sagemaker:")
