"""Limits of the remote clients against real servers on 127.0.0.1: concurrency across callers, the response cap,
per-row reading of scores, redaction of echoed secrets."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import numpy as np
import pytest

from pipeline.blackbox import InputSpec, open_blackbox, parse_output
from tests.plugins.blackbox import send_raw, v2_answer

SPEC = InputSpec()


def _images(n: int, first: int = 0) -> np.ndarray:
    """Images whose first pixel is their index: a crafted server answers each image by it."""
    x = np.zeros((n, 1, 28, 28), np.uint8)
    x[:, 0, 0, 0] = np.arange(first, first + n)
    return x


def _pixel_ids(h) -> np.ndarray:  # noqa: ANN001 - the test server's request handler
    inp = h.body["inputs"][0]
    return np.rint(np.asarray(inp["data"], np.float32).reshape(inp["shape"])[:, 0, 0, 0] * 255).astype(int)


def _quick(**kw: object) -> dict:
    return {"backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5.0, "retries": 0, **kw}


def test_max_concurrency_bounds_every_caller_and_a_wait_for_a_slot_is_not_a_timeout(crafted_v2_server) -> None:
    """The service calls one client from many threads: together they keep at most max_concurrency requests at the
    endpoint, and a request that waits for its turn does not spend its timeout waiting."""
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    def respond(i: int, n: int, h) -> None:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        try:
            time.sleep(0.25)
        finally:
            with lock:
                state["now"] -= 1
        send_raw(h, 200, v2_answer(_pixel_ids(h) % 10, [n], "INT64"))

    srv = crafted_v2_server(respond)
    # 12 callers, some with a batch of 3 images in 2 chunks (the client's pool), most with one (the caller's own
    # thread): about 7 rounds of 0.25 s at 2 at a time, well past the 1 s timeout of any one request
    sizes = [3 if i % 4 == 0 else 1 for i in range(12)]
    results: list = [None] * len(sizes)
    with open_blackbox(srv.url, SPEC, **_quick(max_concurrency=2, max_batch_size=2, timeout_s=1.0)) as bb:
        def call(i: int) -> None:
            results[i] = bb.predict(_images(sizes[i], first=10 * i))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(sizes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        stats = bb.stats()
    assert state["peak"] <= 2, f"{state['peak']} requests in flight at once"
    for i, pred in enumerate(results):
        assert pred.errors == [None] * sizes[i], (i, pred.errors)
        assert pred.labels.tolist() == [(10 * i + k) % 10 for k in range(sizes[i])]
    assert stats["failures"] == 0 and stats["retries"] == 0 and srv.requests == sum(
        1 if s == 1 else 2 for s in sizes)


def test_parse_output_decides_probabilities_per_row() -> None:
    probs = np.array([0.2, 0.5, 0.3])
    logits = np.array([1.0, 3.0, 2.0])
    alone = parse_output(probs[None], 1)
    batch = parse_output(np.stack([probs, logits]), 2)
    assert np.array_equal(batch.scores[0], alone.scores[0]), "a row's scores must not depend on its batch-mates"
    assert np.allclose(alone.scores[0], probs) and np.allclose(batch.scores[1].sum(), 1)
    assert not np.allclose(batch.scores[1], logits / logits.sum()), "logits are still softmaxed"
    # probabilities rounded to 3 decimals over 10 classes sum to 1 only within a few 1e-3: still probabilities
    rounded = np.array([[0.101, 0.101, 0.101, 0.101, 0.101, 0.101, 0.101, 0.101, 0.101, 0.087]])
    assert abs(rounded.sum() - 1) > 1e-3
    assert np.allclose(parse_output(rounded, 1).scores, rounded)


def test_a_row_gets_the_same_scores_whatever_its_batch_mates(crafted_v2_server) -> None:
    """Through a real endpoint: image 0 is answered with probabilities, image 1 with logits."""
    rows = {0: [0.25, 0.7, 0.05], 1: [2.0, -1.0, 0.5]}
    srv = crafted_v2_server(lambda i, n, h: send_raw(h, 200, v2_answer([rows[p] for p in _pixel_ids(h)], [n, 3])))
    with open_blackbox(srv.url, SPEC, **_quick(max_batch_size=8, max_concurrency=1)) as bb:
        alone = bb.predict(_images(1))
        together = bb.predict(_images(2))
    assert alone.errors == [None] and together.errors == [None, None]
    assert np.array_equal(together.scores[0], alone.scores[0])
    assert np.allclose(alone.scores[0], rows[0])


def test_a_response_over_the_cap_is_split_like_a_413(crafted_v2_server) -> None:
    cap = 4096

    def respond(i: int, n: int, h) -> None:
        body = v2_answer(_pixel_ids(h) % 10, [n], "INT64")
        if n > 2:  # many rows x many classes: the answer grows with the request
            body = body[:-1] + b" " * cap + b"}"
        send_raw(h, 200, body)

    srv = crafted_v2_server(respond)
    with open_blackbox(srv.url, SPEC, **_quick(max_batch_size=8, max_concurrency=1, max_response_bytes=cap)) as bb:
        pred = bb.predict(_images(8))
        stats = bb.stats()
    assert pred.errors == [None] * 8 and pred.labels.tolist() == list(range(8))
    assert srv.requests == 1 + 2 + 4  # 8 -> 4 + 4 -> four 2s
    assert stats["queries"] == 1 and stats["retries"] == 6 and stats["failures"] == 0

    # An answer over the cap even for one image: the row says why, and that batch size is not the cure.
    always = crafted_v2_server(lambda i, n, h: send_raw(h, 200, b'{"outputs": [' + b" " * cap + b"]}"))
    with open_blackbox(always.url, SPEC, **_quick(max_batch_size=2, max_concurrency=1, max_response_bytes=cap)) as bb:
        pred = bb.predict(_images(2))
    assert always.requests == 3
    for err in pred.errors:
        assert err.startswith(f"bad response: response larger than {cap} bytes for a single image")
        assert "blackbox.max_batch_size" in err
    assert pred.retryable.tolist() == [True, True], "the endpoint's answer, not the row's data"


def test_sagemaker_response_over_the_cap_is_split() -> None:
    """SageMaker through botocore's Stubber (the AWS API is stubbed, our client is not)."""
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    rt = boto3.client("sagemaker-runtime", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    bb = open_blackbox("sagemaker:ep", SPEC, client=rt, max_response_bytes=1000,
                       **_quick(max_batch_size=2, max_concurrency=1))
    big = v2_answer([2] * 300, [300], "INT64")
    with Stubber(rt) as stub:
        stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(big), len(big))})
        for label in (4, 5):
            ok = v2_answer([label], [1], "INT64")
            stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(ok), len(ok))})
        pred = bb.predict(_images(2))
        stub.assert_no_pending_responses()
    bb.close()
    assert pred.errors == [None, None] and pred.labels.tolist() == [4, 5]


def test_a_secret_echoed_with_escaped_slashes_is_redacted(crafted_v2_server, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    token = "Ab3/xY+9=="
    monkeypatch.setenv("BB_TOKEN", token)
    caplog.set_level(logging.DEBUG)

    def respond(i: int, n: int, h) -> None:
        # PHP's json_encode writes "/" as "\/"
        got = json.dumps(h.headers.get("Authorization")).replace("/", "\\/")
        send_raw(h, 401, f'{{"error": "bad token", "got": {got}}}'.encode())

    srv = crafted_v2_server(respond)
    with open_blackbox(srv.url, SPEC, auth_env="BB_TOKEN", **_quick()) as bb:
        pred = bb.predict(_images(2))
    assert pred.errors == ['http 401: {"error": "bad token", "got": "Bearer ***"}'] * 2
    for t in (*pred.errors, caplog.text):
        assert token not in t and "Ab3\\/xY+9==" not in t, t
