"""Black-box clients against real servers: MLServer, our own flaky/slow v2 servers, onnxruntime, a stubbed AWS API."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.blackbox import (
    BUDGET_EXHAUSTED,
    BlackBoxUnavailable,
    InputSpec,
    Prediction,
    open_blackbox,
    parse_output,
)
from tests.plugins.blackbox import free_port, send_raw, v2_answer

SECRET = "s3cr3t-T0KEN-do-not-leak"
API_KEY = "k3y-also-secret-42"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    from pipeline.datasets import load_fashion_mnist

    return load_fashion_mnist("test")[0][:96, None]


@pytest.fixture(scope="module")
def direct_logits(victim_onnx: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(victim_onnx), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: images.astype(np.float32) / 255.0})[0]


def fast(**kw: object) -> dict:
    """Client options that keep failure tests quick: tiny backoff, short timeouts."""
    return {"backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 2.0, **kw}


def assert_accounted(pred, stats: dict, n: int) -> None:
    """Every row has a label or an error, never both, never neither; counters add up."""
    assert len(pred.labels) == len(pred.errors) == n
    for label, err in zip(pred.labels, pred.errors, strict=True):
        assert (label >= 0) != (err is not None), (label, err)
    assert stats["rows"] == stats["ok"] + stats["failures"]
    assert stats["attempts"] == stats["queries"] + stats["retries"]
    assert stats["images"] == stats["rows"] - stats["budget_rejected"]
    assert stats["failures"] == int(pred.failed.sum())


# ---------------------------------------------------------------------------------------------------------------
# ONNX


def test_onnx_matches_onnxruntime(victim_onnx: Path, images: np.ndarray, direct_logits: np.ndarray) -> None:
    bb = open_blackbox(f"onnx:{victim_onnx}", max_batch_size=40)
    bb.check()
    pred = bb.predict(images)
    assert pred.labels.dtype == np.int64
    assert np.array_equal(pred.labels, direct_logits.argmax(1))
    assert pred.scores.shape == (len(images), 10) and pred.scores.dtype == np.float32
    assert np.allclose(pred.scores.sum(1), 1.0, atol=1e-5)
    assert pred.errors == [None] * len(images)
    s = bb.stats()
    assert s["queries"] == 3 and s["images"] == len(images) and s["failures"] == 0
    assert_accounted(pred, s, len(images))
    # (N, H, W) is accepted for a 1-channel spec
    assert np.array_equal(bb.predict(images[:5, 0]).labels, pred.labels[:5])


def test_onnx_bad_input_raises(victim_onnx: Path, images: np.ndarray) -> None:
    bb = open_blackbox(f"onnx:{victim_onnx}")
    with pytest.raises(ValueError, match="uint8"):
        bb.predict(images.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        bb.predict(np.zeros((2, 3, 28, 28), np.uint8))
    assert len(bb.predict(images[:0]).labels) == 0


def test_onnx_budget_options_and_pickle(victim_onnx: Path, images: np.ndarray) -> None:
    import pickle

    # remote-only options are accepted (one config for file or endpoint); unknown ones are not
    bb = open_blackbox(f"onnx:{victim_onnx}", query_budget=10, max_batch_size=4, max_concurrency=8, timeout_s=1)
    with pytest.raises(TypeError, match="bogus"):
        open_blackbox(f"onnx:{victim_onnx}", bogus=1)
    pred = bb.predict(images[:12])
    assert pred.errors == [None] * 10 + [BUDGET_EXHAUSTED] * 2
    s = bb.stats()
    assert s["queries"] == 3 and s["budget_left"] == 0
    assert_accounted(pred, s, 12)
    # a pickled black box is the recipe to reopen it: same answers, fresh counters and budget
    copy = pickle.loads(pickle.dumps(bb))
    assert copy.stats()["rows"] == 0 and copy.stats()["budget_left"] == 10
    assert np.array_equal(copy.predict(images[:10]).labels, pred.labels[:10])


def test_check_missing_file(tmp_path: Path) -> None:
    bb = open_blackbox(f"onnx:{tmp_path / 'nope.onnx'}")
    with pytest.raises(BlackBoxUnavailable, match="not found"):
        bb.check()
    # predict does not raise: every row records why
    pred = bb.predict(np.zeros((3, 1, 28, 28), np.uint8))
    assert list(pred.labels) == [-1, -1, -1] and all("not found" in e for e in pred.errors)


def test_check_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BlackBoxUnavailable, match="cannot load"):
        open_blackbox(f"onnx:{bad}").check()


def test_spec_scales_and_uri_errors() -> None:
    from pipeline.blackbox import to_model_input

    x = np.array([0, 255, 51], np.uint8).reshape(1, 1, 1, 3)
    assert np.allclose(to_model_input(x, InputSpec(size=3, scale="unit")).ravel(), [0, 1, 0.2])
    assert np.allclose(to_model_input(x, InputSpec(size=3, scale="signed")).ravel(), [-1, 1, -0.6])
    u8 = to_model_input(x, InputSpec(size=3, scale="uint8", datatype="UINT8"))
    assert u8.dtype == np.uint8 and list(u8.ravel()) == [0, 255, 51]
    with pytest.raises(ValueError):
        InputSpec(scale="unit", datatype="UINT8")
    with pytest.raises(ValueError, match="scheme"):
        open_blackbox("ftp://x")
    with pytest.raises(ValueError, match="model name"):
        open_blackbox("v2+http://127.0.0.1:1/")
    with pytest.raises(ValueError) as ei:
        open_blackbox(f"v2+http://user:{SECRET}@127.0.0.1:1/models/m")
    assert SECRET not in str(ei.value)


def test_parse_output_conventions() -> None:
    logits = np.array([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    pred = parse_output(logits, 2)
    assert list(pred.labels) == [1, 2] and np.allclose(pred.scores.sum(1), 1) and pred.errors == [None, None]
    probs = np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    pred = parse_output(probs, 2)
    assert list(pred.labels) == [1, 2] and np.allclose(pred.scores, probs), "a distribution is kept as is"
    assert list(parse_output(np.array([3, 1]), 2).labels) == [3, 1]
    pred = parse_output(np.array([[4.0], [7.0]]), 2)
    assert list(pred.labels) == [4, 7] and pred.scores is None
    for bad in (np.array([0.5, 1.2]), np.zeros((3, 3)), np.zeros((2, 2, 2))):
        with pytest.raises(ValueError):
            parse_output(bad, 2)


# ---------------------------------------------------------------------------------------------------------------
# v2 against a real MLServer


def test_v2_mlserver_matches_onnx(v2_server, victim_onnx: Path, images: np.ndarray) -> None:
    local = open_blackbox(f"onnx:{victim_onnx}").predict(images)
    with open_blackbox(v2_server.url, InputSpec(), max_batch_size=32, max_concurrency=2) as bb:
        bb.check()
        pred = bb.predict(images)
        s = bb.stats()
    assert np.array_equal(pred.labels, local.labels)
    assert np.allclose(pred.scores, local.scores, atol=1e-5)
    assert s["queries"] == 3 and s["retries"] == 0 and s["failures"] == 0
    assert s["latency_ms_p95"] >= s["latency_ms_p50"] > 0
    assert_accounted(pred, s, len(images))


def test_v2_check_unknown_model(v2_server) -> None:
    with open_blackbox(v2_server.url.replace("/models/victim", "/models/nosuch")) as bb:
        with pytest.raises(BlackBoxUnavailable, match="nosuch"):
            bb.check()


def test_v2_check_closed_port_fails_fast() -> None:
    bb = open_blackbox(f"v2+http://127.0.0.1:{free_port()}/models/victim", retries=10)
    t0 = time.monotonic()
    with pytest.raises(BlackBoxUnavailable, match="cannot connect"):
        bb.check()
    # 10 retries with backoff would take ~30 s: a closed port is not worth retrying
    assert time.monotonic() - t0 < 10
    # predict against a closed port: rows fail with a reason after the configured tries, nothing raised
    bb2 = open_blackbox(f"v2+http://127.0.0.1:{free_port()}/models/victim", **fast(retries=1))
    pred = bb2.predict(np.zeros((3, 1, 28, 28), np.uint8))
    assert list(pred.labels) == [-1] * 3
    assert pred.errors == ["connect error after 2 tries"] * 3


# ---------------------------------------------------------------------------------------------------------------
# Our own servers: batching, failures, budget, secrets


def test_batching_splits(flaky_v2_server, images: np.ndarray, direct_logits: np.ndarray) -> None:
    srv = flaky_v2_server(fail_rate=0.0)
    bb = open_blackbox(srv.url, max_batch_size=10, max_concurrency=3)
    pred = bb.predict(images[:45])
    assert np.array_equal(pred.labels, direct_logits[:45].argmax(1)), "order must survive concurrency"
    assert srv.requests == 5 and bb.stats()["queries"] == 5
    assert_accounted(pred, bb.stats(), 45)
    bb.close()


def test_flaky_server_everything_accounted(flaky_v2_server, images: np.ndarray, direct_logits: np.ndarray) -> None:
    srv = flaky_v2_server(fail_rate=0.3, seed=1, retry_after="0", slow_s=0.6)
    bb = open_blackbox(srv.url, **fast(max_batch_size=4, max_concurrency=4, retries=4, timeout_s=0.3))
    pred = bb.predict(images)
    s = bb.stats()
    assert_accounted(pred, s, len(images))
    ok = ~pred.failed
    assert np.array_equal(pred.labels[ok], direct_logits.argmax(1)[ok]), "retried rows must get the right label"
    assert s["attempts"] == srv.requests, "every attempt reached the server once"
    assert s["retries"] == srv.requests - s["queries"] > 0
    assert sum(srv.counts[m] for m in ("503", "429", "reset", "slow")) > 0
    for err in pred.errors:
        assert err is None or err.endswith("after 5 tries")


def test_every_failure_mode_is_recorded(flaky_v2_server) -> None:
    x = np.zeros((6, 1, 28, 28), np.uint8)
    expected = {"503": "http 503 after 2 tries", "429": "http 429 after 2 tries",
                "reset": "connection reset after 2 tries", "slow": "timeout after 2 tries"}
    for mode, err in expected.items():
        srv = flaky_v2_server(fail_rate=1.0, modes=(mode,), retry_after="0", slow_s=0.5)
        # a short timeout only where a timeout is the point: elsewhere a busy CI box must not turn 503s into timeouts
        bb = open_blackbox(srv.url, **fast(max_batch_size=4, retries=1, timeout_s=0.2 if mode == "slow" else 5.0))
        pred = bb.predict(x)
        assert list(pred.labels) == [-1] * 6 and pred.errors == [err] * 6, mode
        s = bb.stats()
        assert s["failures"] == 6 and s["queries"] == 2 and s["retries"] == 2
        assert_accounted(pred, s, 6)


def test_retry_after_is_honoured(flaky_v2_server, images: np.ndarray) -> None:
    srv = flaky_v2_server(schedule=["429", "ok"], fail_rate=0.0, retry_after="1")
    bb = open_blackbox(srv.url, **fast(retries=2))
    t0 = time.monotonic()
    pred = bb.predict(images[:4])
    assert time.monotonic() - t0 >= 0.95, "the client must wait at least Retry-After"
    assert pred.errors == [None] * 4 and bb.stats()["retries"] == 1


def test_non_retryable_status_fails_at_once(flaky_v2_server) -> None:
    srv = flaky_v2_server(fail_rate=0.0, require_headers={"Authorization": "Bearer right"})
    bb = open_blackbox(srv.url, **fast(retries=5))
    pred = bb.predict(np.zeros((2, 1, 28, 28), np.uint8))
    assert pred.errors == ["http 401: " + json.dumps({"error": "unauthorized"})] * 2
    assert bb.stats()["retries"] == 0 and srv.requests == 0


def test_a_refused_request_is_split_until_each_refusal_names_one_row(crafted_v2_server) -> None:
    """A 4xx answers the whole request: a body-size limit fails every row of a big request alike, and one bad image
    fails its chunk-mates. Only a row refused alone is refused for its own data (not retried by the next run)."""
    def respond(i: int, n: int, h) -> None:
        data = np.asarray(h.body["inputs"][0]["data"], np.float32).reshape(n, -1)
        if n > 4:
            send_raw(h, 413, b'{"error": "request entity too large"}')
        elif (data[:, 0] > 0.5).any():
            send_raw(h, 422, b'{"error": "pixel out of range"}')
        else:
            send_raw(h, 200, v2_answer(np.full(n, 7), [n], "INT64"))

    srv = crafted_v2_server(respond)
    x = np.zeros((16, 1, 28, 28), np.uint8)
    x[5, 0, 0, 0] = 255
    bb = open_blackbox(srv.url, max_batch_size=16, max_concurrency=1, **fast(retries=0))
    pred = bb.predict(x)
    assert pred.errors[5].startswith("http 422") and not pred.retryable[5]
    assert [e for i, e in enumerate(pred.errors) if i != 5] == [None] * 15
    assert list(pred.labels[:5]) == [7] * 5 and pred.labels[5] == -1
    # 16 -> 8 + 8 -> four 4s -> 2 + 2 -> 1 + 1
    assert srv.requests == 1 + 2 + 4 + 2 + 2
    assert_accounted(pred, bb.stats(), 16)

    # A limit no split gets under (413 even for one image) belongs to the deployment: every row is retried later.
    always = crafted_v2_server(lambda i, n, h: send_raw(h, 413, b'{"error": "request entity too large"}'))
    refused = open_blackbox(always.url, max_batch_size=2, max_concurrency=1, **fast(retries=0)).predict(x[:2])
    assert refused.errors == ['http 413: {"error": "request entity too large"}'] * 2
    assert list(refused.retryable) == [True, True] and always.requests == 3


def test_an_endpoint_refusing_every_image_is_not_the_images_fault(crafted_v2_server) -> None:
    """A model reloading or an input contract changed under the job refuses every request: each image refused
    alone then says nothing against it, so the rows are retried by the next run, not frozen as their own; so is a
    lone image refused while that lasts. The first answer ends it."""
    state = {"broken": True}

    def respond(i: int, n: int, h) -> None:
        if state["broken"]:
            send_raw(h, 400, b'{"error": "input-0: unexpected shape"}')
        else:
            send_raw(h, 200, v2_answer(np.full(n, 2), [n], "INT64"))

    srv = crafted_v2_server(respond)
    bb = open_blackbox(srv.url, max_batch_size=4, max_concurrency=1, **fast(retries=0))
    x = np.zeros((5, 1, 28, 28), np.uint8)
    pred = bb.predict(x)  # a request of 4 (split to single images) and one of 1
    assert list(pred.retryable) == [True] * 5 and list(pred.labels) == [-1] * 5
    assert all("http 400" in e for e in pred.errors)
    assert all(e.startswith("every image of the request refused, each alone too") for e in pred.errors[:4])
    state["broken"] = False
    assert bb.predict(x[:2]).errors == [None, None]
    state["broken"] = True
    lone = bb.predict(x[:1])  # refused alone after answers: this image's own data
    assert lone.errors[0].startswith("http 400") and list(lone.retryable) == [False]


def test_slow_server_times_out_and_recovers(slow_v2_server) -> None:
    srv = slow_v2_server(delay_s=0.5)
    x = np.zeros((2, 1, 28, 28), np.uint8)
    bb = open_blackbox(srv.url, **fast(retries=0, timeout_s=0.15))
    assert bb.predict(x).errors == ["timeout after 1 try"] * 2
    patient = open_blackbox(srv.url, **fast(retries=0, timeout_s=3.0))
    assert patient.predict(x).errors == [None, None]


def test_query_budget(flaky_v2_server, images: np.ndarray) -> None:
    srv = flaky_v2_server(fail_rate=0.0)
    bb = open_blackbox(srv.url, max_batch_size=8, query_budget=20)
    first = bb.predict(images[:12])
    assert first.errors == [None] * 12
    second = bb.predict(images[12:24])
    assert second.errors == [None] * 8 + [BUDGET_EXHAUSTED] * 4
    assert list(second.labels[8:]) == [-1] * 4
    third = bb.predict(images[:3])
    assert third.errors == [BUDGET_EXHAUSTED] * 3
    s = bb.stats()
    assert s["images"] == 20 and s["budget_rejected"] == 7 and s["budget_left"] == 0
    assert srv.requests == 3  # 12 -> 8 + 4, then 8; nothing sent for the third call
    assert_accounted(Prediction.concat([first, second, third]), s, 27)


def test_rate_limit(flaky_v2_server) -> None:
    srv = flaky_v2_server(fail_rate=0.0)
    bb = open_blackbox(srv.url, max_batch_size=1, max_concurrency=4, rate_limit_qps=20)
    t0 = time.monotonic()
    bb.predict(np.zeros((6, 1, 28, 28), np.uint8))
    # 6 request starts spaced 1/20 s apart take at least 5/20 s whatever the concurrency
    assert time.monotonic() - t0 >= 0.24


def test_secrets_never_leak(flaky_v2_server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                            images: np.ndarray) -> None:
    monkeypatch.setenv("BB_TOKEN", SECRET)
    monkeypatch.setenv("BB_API_KEY", API_KEY)
    caplog.set_level(logging.DEBUG)
    # right headers: they reach the server
    good = flaky_v2_server(fail_rate=0.0, require_headers={"Authorization": f"Bearer {SECRET}", "X-Api-Key": API_KEY})
    bb = open_blackbox(good.url, auth_env="BB_TOKEN", header_env={"X-Api-Key": "BB_API_KEY"})
    assert bb.predict(images[:2]).errors == [None, None]
    assert good.headers_seen["Authorization"] == f"Bearer {SECRET}" and good.headers_seen["X-Api-Key"] == API_KEY
    # a server that echoes the wrong credential back, plus retries and failures that get logged
    echo = flaky_v2_server(fail_rate=0.0, require_headers={"Authorization": "Bearer other"}, echo_headers=True)
    bb_echo = open_blackbox(echo.url, auth_env="BB_TOKEN", header_env={"X-Api-Key": "BB_API_KEY"}, **fast())
    flaky = flaky_v2_server(fail_rate=1.0, modes=("503",), retry_after="0")
    bb_flaky = open_blackbox(flaky.url, auth_env="BB_TOKEN", header_env={"X-Api-Key": "BB_API_KEY"},
                             **fast(retries=2))
    texts = []
    for client in (bb_echo, bb_flaky):
        pred = client.predict(images[:2])
        assert all(e is not None for e in pred.errors)
        texts += [e for e in pred.errors if e] + [repr(client), str(client), json.dumps(client.stats())]
    assert "***" in texts[0], "the echoed credential must be redacted, not dropped silently"
    import pickle

    texts.append(pickle.dumps(bb_flaky).decode("latin-1"))  # Ray ships black boxes pickled: env names only
    closed = open_blackbox(f"v2+http://127.0.0.1:{free_port()}/models/victim", auth_env="BB_TOKEN")
    with pytest.raises(BlackBoxUnavailable) as ei:
        closed.check()
    texts += [str(ei.value), repr(ei.value), repr(ei.value.__cause__), repr(ei.value.__context__)]
    texts += [r.getMessage() for r in caplog.records] + [caplog.text]
    for t in texts:
        assert SECRET not in t and API_KEY not in t, t
    # a missing variable names the variable, not a value
    monkeypatch.delenv("BB_TOKEN")
    with pytest.raises(ValueError, match="BB_TOKEN"):
        open_blackbox(good.url, auth_env="BB_TOKEN")


# ---------------------------------------------------------------------------------------------------------------
# SageMaker: request/response encoding through botocore's Stubber (the AWS client is stubbed, our code is not)


def _sm_clients():
    import boto3

    rt = boto3.client("sagemaker-runtime", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    ctl = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    return rt, ctl


def test_sagemaker_encoding_with_stubber(images: np.ndarray, direct_logits: np.ndarray) -> None:
    from botocore.response import StreamingBody
    from botocore.stub import ANY, Stubber

    rt, ctl = _sm_clients()
    bb = open_blackbox("sagemaker:victim-endpoint", max_batch_size=3, max_concurrency=1, client=rt,
                       control_client=ctl, target_variant="AllTraffic", **fast(retries=1))
    x = images[:5]
    bodies: list[bytes] = []
    with Stubber(rt) as stub, Stubber(ctl) as cstub:
        cstub.add_response("describe_endpoint", {
            "EndpointName": "victim-endpoint", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/v",
            "EndpointConfigName": "c", "EndpointStatus": "InService", "CreationTime": "2026-01-01",
            "LastModifiedTime": "2026-01-01"}, {"EndpointName": "victim-endpoint"})
        bb.check()
        for a, b in ((0, 3), (3, 5)):
            logits = direct_logits[a:b]
            out = json.dumps({"model_name": "v", "outputs": [{"name": "logits", "shape": list(logits.shape),
                                                              "datatype": "FP32", "data": logits.ravel().tolist()}]})
            expected = {"EndpointName": "victim-endpoint", "ContentType": "application/json",
                        "Accept": "application/json", "Body": ANY, "TargetVariant": "AllTraffic"}
            stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(out.encode()), len(out)),
                                                  "ContentType": "application/json"}, expected)
        # capture what we send, to check the v2 encoding itself (the Stubber answers at before-call, so earlier)
        rt.meta.events.register("before-parameter-build.sagemaker-runtime.InvokeEndpoint",
                                lambda params, **kw: bodies.append(params["Body"]))
        pred = bb.predict(x)
        stub.assert_no_pending_responses()
    assert np.array_equal(pred.labels, direct_logits[:5].argmax(1))
    req = json.loads(bodies[0])
    inp = req["inputs"][0]
    assert inp["name"] == "input-0" and inp["datatype"] == "FP32" and inp["shape"] == [3, 1, 28, 28]
    assert np.allclose(np.array(inp["data"], np.float32).reshape(3, 1, 28, 28), x[:3] / 255.0)


def test_sagemaker_errors_with_stubber() -> None:
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    rt, ctl = _sm_clients()
    bb = open_blackbox("sagemaker:ep", client=rt, control_client=ctl, **fast(retries=1))
    x = np.zeros((2, 1, 28, 28), np.uint8)
    with Stubber(rt) as stub, Stubber(ctl) as cstub:
        # throttled twice: retried once, then recorded
        stub.add_client_error("invoke_endpoint", "ThrottlingException", "slow down", 400)
        stub.add_client_error("invoke_endpoint", "ThrottlingException", "slow down", 400)
        # the container answered 4xx: not retried, but the request is split so that each row is refused alone;
        # refusing each of them says nothing against either (the endpoint's fault: retried by the next run) ...
        for _ in range(3):
            stub.add_client_error("invoke_endpoint", "ModelError", "bad input", 424,
                                  modeled_fields={"OriginalStatusCode": 400})
        # ... while answering one of them makes the other's refusal its own
        stub.add_client_error("invoke_endpoint", "ModelError", "bad input", 424,
                              modeled_fields={"OriginalStatusCode": 400})
        out = json.dumps({"model_name": "v", "outputs": [{"name": "logits", "shape": [1, 10], "datatype": "FP32",
                                                          "data": [0.0] * 3 + [5.0] + [0.0] * 6}]})
        stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(out.encode()), len(out)),
                                              "ContentType": "application/json"})
        stub.add_client_error("invoke_endpoint", "ModelError", "bad input", 424,
                              modeled_fields={"OriginalStatusCode": 400})
        # SageMaker's own 400s are about the call (credentials, the endpoint): the next run must ask again
        stub.add_client_error("invoke_endpoint", "AccessDeniedException", "not allowed", 400)
        cstub.add_response("describe_endpoint", {
            "EndpointName": "ep", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/ep",
            "EndpointConfigName": "c", "EndpointStatus": "Creating", "CreationTime": "2026-01-01",
            "LastModifiedTime": "2026-01-01"})
        first = bb.predict(x)
        second = bb.predict(x)
        own = bb.predict(x)
        third = bb.predict(x)
        with pytest.raises(BlackBoxUnavailable, match="Creating"):
            bb.check()
        stub.assert_no_pending_responses()
    assert first.errors == ["sagemaker ThrottlingException (http 400) after 2 tries"] * 2
    assert list(first.retryable) == [True, True]
    assert all(e.startswith("every image of the request refused, each alone too") and "sagemaker ModelError" in e
               for e in second.errors)
    assert list(second.retryable) == [True, True]
    assert own.errors[0] is None and own.labels[0] == 3 and own.errors[1].startswith("sagemaker ModelError")
    assert list(own.retryable) == [False, False]
    assert third.errors == ["sagemaker AccessDeniedException (http 400): not allowed"] * 2
    assert list(third.retryable) == [True, True]
    s = bb.stats()
    assert s["retries"] == 5 and s["failures"] == 7  # one throttle, two halves of each refused request
