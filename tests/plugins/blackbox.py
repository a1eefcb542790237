"""Black-box servers for tests, all on 127.0.0.1 with real sockets.

Fixtures
- ``victim_onnx`` (session): Path of models/victims/badnets.onnx (skips when the file is missing).
- ``v2_server`` (session): a real MLServer 1.7.1 process (``mlserver start DIR``) serving the victim as model
  "victim" through tests/plugins/mlserver_onnx.py. Attributes: ``.url`` ("v2+http://127.0.0.1:PORT/models/victim"),
  ``.base_url``, ``.model_name``, ``.onnx_path``, ``.log_path``.
- ``flaky_v2_server`` (factory): ``flaky_v2_server(fail_rate=0.2, modes=("503", "429", "reset", "slow"), seed=0,
  retry_after="1", slow_s=2.0, schedule=None, require_headers=None, echo_headers=False, model_path=None)`` -> a
  ``V2TestServer`` (our own small v2 server in front of the ONNX model). The i-th infer request to arrive fails with
  a seeded draw; ``schedule`` (a list of modes, "ok" for success) overrides the first len(schedule) requests.
  Attributes: ``.url``, ``.base_url``, ``.requests`` (infer requests received), ``.counts`` (per outcome),
  ``.headers_seen`` (headers of the last infer request).
- ``slow_v2_server`` (factory): ``slow_v2_server(delay_s=1.0)`` -> a ``V2TestServer`` that answers every infer
  request correctly but only after ``delay_s``.
- ``crafted_v2_server`` (factory): ``crafted_v2_server(respond, require_headers=None)`` -> a ``CraftedV2Server``
  whose i-th infer request is answered by ``respond(i, n_rows, handler)`` (write with ``send_raw``, build v2
  bodies with ``v2_answer``): huge or negative labels, bombs, trickled bodies, echoed secrets.
All factory-made servers stop at the end of the test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
# BB_VICTIM_ONNX lets a run point the servers at another model file (e.g. while the committed one is retrained)
VICTIM = Path(os.environ.get("BB_VICTIM_ONNX", REPO / "models" / "victims" / "badnets.onnx"))
MODES = ("503", "429", "reset", "slow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def victim_onnx() -> Path:
    if not VICTIM.is_file():
        pytest.skip(f"{VICTIM} missing: python jobs/train_victim.py --attack badnets --out {VICTIM}")
    return VICTIM


# ---------------------------------------------------------------------------------------------------------------
# MLServer, the real thing.


@dataclass
class MLServerHandle:
    url: str
    base_url: str
    model_name: str
    onnx_path: Path
    log_path: Path
    proc: subprocess.Popen = field(repr=False)


def _mlserver_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "mlserver"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mlserver")
    if not found:
        pytest.skip("mlserver is not installed (pip install mlserver==1.7.1)")
    return [found]


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlserver exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"mlserver not ready after {timeout_s}s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def v2_server(tmp_path_factory: pytest.TempPathFactory, victim_onnx: Path) -> Iterator[MLServerHandle]:
    root = tmp_path_factory.mktemp("mlserver")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    (root / "settings.json").write_text(json.dumps({
        "debug": False, "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
        "metrics_port": metrics_port, "parallel_workers": 0, "load_models_at_startup": True,
    }))
    model_dir = root / "victim"
    model_dir.mkdir()
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": "victim", "implementation": "tests.plugins.mlserver_onnx.OnnxRuntimeModel",
        "parameters": {"uri": str(victim_onnx)},
    }))
    log_path = root / "mlserver.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*_mlserver_cmd(), "start", str(root)], cwd=root, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        _wait_ready(f"{base}/v2/models/victim/ready", proc, log_path, timeout_s=90)
        yield MLServerHandle(f"v2+{base}/models/victim", base, "victim", victim_onnx, log_path, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# ---------------------------------------------------------------------------------------------------------------
# Our own v2 server, for failure modes MLServer cannot be made to produce on demand.


class _OnnxModel:
    _cache: dict[Path, _OnnxModel] = {}

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inp = self.sess.get_inputs()[0].name
        self.out = self.sess.get_outputs()[0].name

    @classmethod
    def get(cls, path: Path) -> _OnnxModel:
        if path not in cls._cache:
            cls._cache[path] = cls(path)
        return cls._cache[path]


class V2TestServer:
    def __init__(self, model_path: Path, *, model_name: str = "victim", fail_rate: float = 0.0,
                 modes: Sequence[str] = MODES, seed: int = 0, retry_after: str | None = "1", slow_s: float = 2.0,
                 schedule: Sequence[str] | None = None, require_headers: Mapping[str, str] | None = None,
                 echo_headers: bool = False) -> None:
        unknown = set(modes) - set(MODES) | set(schedule or ()) - {*MODES, "ok"}
        if unknown:
            raise ValueError(f"unknown failure modes {unknown}")
        self.model = _OnnxModel.get(Path(model_path))
        self.model_name = model_name
        self.fail_rate, self.modes, self.retry_after, self.slow_s = fail_rate, tuple(modes), retry_after, slow_s
        self.schedule = list(schedule or ())
        self.require_headers = dict(require_headers or {})
        self.echo_headers = echo_headers
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.requests = 0
        self.images = 0  # images answered (what an endpoint's owner bills)
        self.arrivals: list[float] = []  # time.monotonic() of each infer request
        self.down_until = 0.0  # time.monotonic() until which every infer request gets a 503 (an outage)
        self.counts: Counter[str] = Counter()
        self.headers_seen: dict[str, str] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # a "slow" handler may still sleep: do not wait for it at teardown
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.url = f"v2+{self.base_url}/models/{model_name}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def _next_outcome(self) -> str:
        with self._lock:
            i = self.requests
            self.requests += 1
            self.arrivals.append(time.monotonic())
            # both draws happen for every request so the schedule of request i never depends on earlier outcomes
            u, m = self._rng.random(), self._rng.integers(len(self.modes)) if self.modes else 0
            if i < len(self.schedule):
                outcome = self.schedule[i]
            else:
                outcome = self.modes[m] if self.modes and u < self.fail_rate else "ok"
            self.counts[outcome] += 1
            return outcome

    def outage(self, seconds: float) -> None:
        """From now on, for `seconds`, answer every infer request with 503 (the endpoint is down)."""
        self.down_until = time.monotonic() + seconds

    def infer(self, body: dict) -> dict:
        inp = body["inputs"][0]
        x = np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"])
        out = self.model.sess.run(None, {self.model.inp: x})[0]
        with self._lock:
            self.images += len(x)
        return {"model_name": self.model_name, "id": body.get("id"),
                "outputs": [{"name": self.model.out, "shape": list(out.shape), "datatype": "FP32",
                             "data": out.ravel().tolist()}]}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like real servers: resets then hit pooled connections

            def log_message(self, *args: object) -> None:
                pass

            def _json(self, code: int, obj: object, extra: Mapping[str, str] | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path in ("/v2/health/ready", "/v2/health/live"):
                    self._json(200, {"ready": True})
                elif self.path == f"/v2/models/{server.model_name}/ready":
                    self._json(200, {"name": server.model_name, "ready": True})
                else:
                    self._json(404, {"error": f"no route {self.path}"})

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != f"/v2/models/{server.model_name}/infer":
                    self._json(404, {"error": f"no route {self.path}"})
                    return
                with server._lock:
                    server.headers_seen = dict(self.headers.items())
                for k, v in server.require_headers.items():
                    if self.headers.get(k) != v:
                        # a careless server that echoes what it got: the client must redact it
                        msg = f"unauthorized: got {k}={self.headers.get(k)}" if server.echo_headers else "unauthorized"
                        self._json(401, {"error": msg})
                        return
                outcome = server._next_outcome() if time.monotonic() >= server.down_until else "503"
                try:
                    if outcome == "503":
                        self._json(503, {"error": "overloaded"})
                    elif outcome == "429":
                        self._json(429, {"error": "slow down"},
                                   {"Retry-After": server.retry_after} if server.retry_after else None)
                    elif outcome == "reset":
                        # SO_LINGER 0 makes close() send RST: the client sees a connection reset, not a clean EOF
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                        self.close_connection = True
                    else:
                        if outcome == "slow":
                            time.sleep(server.slow_s)
                        try:
                            resp = server.infer(json.loads(raw))
                        except Exception as e:  # noqa: BLE001 - a bad request is a 400, as in real servers
                            self._json(400, {"error": f"bad request: {e}"})
                            return
                        self._json(200, resp)
                except OSError:
                    # the client gave up (timeout) and closed the socket while we slept
                    self.close_connection = True

        return Handler

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _factory(victim_onnx: Path, defaults: Mapping[str, object]) -> Iterator[Callable[..., V2TestServer]]:
    made: list[V2TestServer] = []

    def make(**kw: object) -> V2TestServer:
        srv = V2TestServer(kw.pop("model_path", None) or victim_onnx, **{**defaults, **kw})
        made.append(srv)
        return srv

    yield make
    for s in made:
        s.close()


@pytest.fixture
def flaky_v2_server(victim_onnx: Path) -> Iterator[Callable[..., V2TestServer]]:
    yield from _factory(victim_onnx, {"fail_rate": 0.2, "modes": MODES})


@pytest.fixture
def slow_v2_server(victim_onnx: Path) -> Iterator[Callable[..., V2TestServer]]:
    def make(delay_s: float = 1.0, **kw: object) -> V2TestServer:
        return inner(fail_rate=1.0, modes=("slow",), slow_s=delay_s, **kw)

    gen = _factory(victim_onnx, {})
    inner = next(gen)
    yield make
    next(gen, None)


# ---------------------------------------------------------------------------------------------------------------
# A crafted endpoint: every infer answer is written by the test, byte for byte (hostile and broken servers).


def send_raw(handler: BaseHTTPRequestHandler, code: int, body: bytes | Sequence[tuple[bytes, float]],
             headers: Mapping[str, str] | None = None) -> None:
    """Answer with ``body``, or with (chunk, delay before it) pieces for a server that trickles its answer."""
    pieces = [(body, 0.0)] if isinstance(body, bytes) else list(body)
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(sum(len(c) for c, _ in pieces)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    try:
        for chunk, delay in pieces:
            time.sleep(delay)
            handler.wfile.write(chunk)
            handler.wfile.flush()
    except OSError:
        handler.close_connection = True  # the client gave up


def v2_answer(data: object, shape: Sequence[int], datatype: str = "FP32") -> bytes:
    return json.dumps({"model_name": "victim",
                       "outputs": [{"name": "out", "shape": list(shape), "datatype": datatype,
                                    "data": np.asarray(data).ravel().tolist()}]}).encode()


class CraftedV2Server:
    """Ready checks answer 200; the i-th infer request is answered by ``respond(i, n_rows, handler)`` (the request's
    parsed JSON body is ``handler.body``)."""

    def __init__(self, respond: Callable[[int, int, BaseHTTPRequestHandler], None], model_name: str = "victim",
                 require_headers: Mapping[str, str] | None = None) -> None:
        server = self
        self.respond, self.model_name = respond, model_name
        self.require_headers = dict(require_headers or {})
        self.requests = 0
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                send_raw(self, 200, b'{"ready": true}')

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                for k, v in server.require_headers.items():
                    if self.headers.get(k) != v:
                        send_raw(self, 401, b'{"error": "unauthorized"}')
                        return
                with server._lock:
                    i = server.requests
                    server.requests += 1
                self.body = body
                server.respond(i, int(body["inputs"][0]["shape"][0]), self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.url = f"v2+{self.base_url}/models/{model_name}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def crafted_v2_server() -> Iterator[Callable[..., CraftedV2Server]]:
    """``crafted_v2_server(respond, require_headers=None)`` -> a CraftedV2Server, stopped after the test."""
    made: list[CraftedV2Server] = []

    def make(respond: Callable[[int, int, BaseHTTPRequestHandler], None], **kw: object) -> CraftedV2Server:
        srv = CraftedV2Server(respond, **kw)
        made.append(srv)
        return srv

    yield make
    for s in made:
        s.close()
