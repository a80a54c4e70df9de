"""`infer serve` over loopback, driven by the real `openai` client (and raw HTTP for malformed
requests): a server process started as a user starts it, on SmolLM2-135M-Instruct."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-123"
PARALLEL = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    def __init__(self, model: Path, *args, key=KEY, threads=2):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "INFER_API_KEY": key} if key else {k: v for k, v in os.environ.items()
                                                              if k != "INFER_API_KEY"}
        exe = Path(sys.executable).with_name("infer")
        self.p = subprocess.Popen([str(exe), "serve", str(model), "--port", str(self.port), "-t", str(threads), *args],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while time.time() - t0 < 300:
            if self.p.poll() is not None:
                raise RuntimeError(f"server exited {self.p.returncode}: {self.p.stderr.read()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not come up in 300 s")

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key or "none", max_retries=0, timeout=120)

    def raw(self, path, body=None, method=None, key=KEY, raw_body=None):
        data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method or ("POST" if data is not None else "GET"))
        req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = ServerProc(smollm2_path, "-np", str(PARALLEL), "-c", "4096")
    yield s
    s.stop()


MSG = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_stream_equals_non_stream(server):
    c = server.client()
    r = c.chat.completions.create(model="m", messages=MSG, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parts, reasons = [], []
    for ch in c.chat.completions.create(model="m", messages=MSG, temperature=0, max_tokens=24, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            reasons.append(ch.choices[0].finish_reason)
        else:
            assert ch.usage.completion_tokens == r.usage.completion_tokens
    assert "".join(parts) == text
    assert reasons[-1] == r.choices[0].finish_reason and all(x is None for x in reasons[:-1])


def test_completion_stream_equals_non_stream(server):
    c = server.client()
    r = c.completions.create(model="m", prompt="The capital of France is", temperature=0, max_tokens=16)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 16
    s = "".join(ch.choices[0].text for ch in c.completions.create(
        model="m", prompt="The capital of France is", temperature=0, max_tokens=16, stream=True))
    assert s == r.choices[0].text and "Paris" in s


def test_stop_and_seed(server):
    c = server.client()
    r = c.completions.create(model="m", prompt="1, 2, 3, 4,", temperature=0, max_tokens=32, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and " 7" not in r.choices[0].text and "6" in r.choices[0].text
    a = [c.completions.create(model="m", prompt="Once upon a time", temperature=1.0, seed=7, max_tokens=12)
         .choices[0].text for _ in range(2)]
    assert a[0] == a[1]


def test_models_health_metrics(server):
    m = server.client().models.list()
    assert [x.id for x in m.data] == ["SmolLM2-135M-Instruct.Q4_1"]
    st, body = server.raw("/health", key=None)
    assert st == 200 and json.loads(body)["status"] == "ok"
    st, body = server.raw("/metrics", key=None)
    assert st == 200
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in body.splitlines() if ln and not ln.startswith("#")}
    assert vals["infer_requests_total"] >= 1 and vals["infer_slots_total"] == PARALLEL
    assert vals["infer_ttft_seconds_count"] >= 1 and vals["infer_completion_tokens_total"] >= 1
    assert "infer_queue_depth" in vals and vals["infer_kv_pool_bytes"] > 0


@pytest.fixture(scope="module")
def invariant_server(smollm2_path):
    s = ServerProc(smollm2_path, "-np", str(PARALLEL), "-c", "4096", "--batch-invariant")
    yield s
    s.stop()


def test_concurrent_streams_equal_alone(invariant_server):
    """8 greedy streams at once (4 run, 4 wait for a slot) on --batch-invariant: each equals its
    text run alone (by default a lone stream runs the fused one-token step, whose rounding differs:
    tests/test_batch.py checks that texts then part only at near ties)."""
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]
    c = invariant_server.client()
    alone = [c.chat.completions.create(model="m", messages=[{"role": "user", "content": p}], temperature=0,
                                       max_tokens=20).choices[0].message.content for p in prompts]
    got = [None] * 8

    def run(i):
        got[i] = "".join((ch.choices[0].delta.content or "") for ch in c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompts[i]}], temperature=0, max_tokens=20,
            stream=True))
    ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert got == alone


def test_prefix_cache_reuses_a_shared_system_prompt(server):
    system = "You are a helpful assistant. " + " ".join(f"Rule {i}: be precise about item {i}." for i in range(60))
    c = server.client()
    a = c.chat.completions.create(model="m", messages=[{"role": "system", "content": system},
                                                        {"role": "user", "content": "Hi"}], temperature=0, max_tokens=4)
    b = c.chat.completions.create(model="m", messages=[{"role": "system", "content": system},
                                                        {"role": "user", "content": "Hello there"}], temperature=0,
                                  max_tokens=4)
    assert a.usage.prompt_tokens > 500
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached >= a.usage.prompt_tokens - 10, (cached, a.usage.prompt_tokens)


BAD = [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", None, {}),
    ("/v1/chat/completions", None, {"messages": []}),
    ("/v1/chat/completions", None, {"messages": "hi"}),
    ("/v1/chat/completions", None, {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", None, {"messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", None, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("/v1/chat/completions", None, {"messages": MSG, "max_tokens": -3}),
    ("/v1/chat/completions", None, {"messages": MSG, "max_tokens": "ten"}),
    ("/v1/chat/completions", None, {"messages": MSG, "temperature": "hot"}),
    ("/v1/chat/completions", None, {"messages": MSG, "temperature": 9}),
    ("/v1/chat/completions", None, {"messages": MSG, "top_p": 0}),
    ("/v1/chat/completions", None, {"messages": MSG, "n": 3}),
    ("/v1/chat/completions", None, {"messages": MSG, "stop": [1, 2]}),
    ("/v1/chat/completions", None, {"messages": MSG, "stream": "yes"}),
    ("/v1/chat/completions", None, {"messages": MSG, "seed": 1.5}),
    ("/v1/chat/completions", None, {"messages": [{"role": "user", "content": "word " * 5000}]}),
    ("/v1/completions", None, {"prompt": ""}),
    ("/v1/completions", None, {"prompt": [1, "a"]}),
    ("/v1/completions", None, {"prompt": [10 ** 9]}),
    ("/v1/completions", None, {"prompt": "hi", "max_tokens": 0}),
]


@pytest.mark.parametrize("path,raw,body", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_malformed_requests_get_openai_errors(server, path, raw, body):
    st, text = server.raw(path, body, raw_body=raw)
    assert 400 <= st < 500, (st, text)
    err = json.loads(text)["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and "Traceback" not in text


def test_errors_then_still_serving(server):
    st, text = server.raw("/v1/nope", {"a": 1})
    assert st == 404 and json.loads(text)["error"]["code"] == "not_found"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    st, text = server.raw("/v1/models", key=None)
    assert st == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    r = server.client().completions.create(model="m", prompt="Hello", temperature=0, max_tokens=2)
    assert r.usage.completion_tokens == 2


def _busy(server):
    return json.loads(server.raw("/health", key=None)[1])["slots_busy"]


def test_dropped_stream_frees_its_sequence(server):
    c = server.client()
    s = c.completions.create(model="m", prompt="1, 2, 3, 4,", temperature=0, max_tokens=400, stream=True)
    it = iter(s)
    next(it), next(it)
    assert _busy(server) == 1
    s.close()                       # the client goes away mid-stream
    t0 = time.time()
    while _busy(server) and time.time() - t0 < 5:
        time.sleep(0.05)
    assert _busy(server) == 0, "the dropped stream's sequence kept running"


def test_queue_full_is_503_and_sigterm_exits_cleanly(smollm2_path):
    srv = ServerProc(smollm2_path, "-np", "1", "--queue", "1", "-c", "1024", key=None)
    try:
        c = srv.client(key=None)
        streams = [c.completions.create(model="m", prompt="1, 2, 3, 4,", temperature=0, max_tokens=300, stream=True)]
        next(iter(streams[0]))                  # the one slot is busy
        waiting = threading.Thread(target=lambda: srv.raw("/v1/completions", {"prompt": "x", "max_tokens": 2},
                                                          key=None))
        waiting.start()
        t0 = time.time()
        while json.loads(srv.raw("/health", key=None)[1])["queue"] < 1 and time.time() - t0 < 10:
            time.sleep(0.05)
        st, text = srv.raw("/v1/completions", {"prompt": "y", "max_tokens": 2}, key=None)
        assert st == 503 and json.loads(text)["error"]["code"] == "queue_full"
        t0 = time.time()
        rc = srv.stop(signal.SIGTERM, timeout=15)
        assert rc == 0 and time.time() - t0 < 10
        waiting.join(10)
    finally:
        srv.stop(signal.SIGKILL)


def test_port_in_use_is_a_one_line_error(smollm2_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        exe = Path(sys.executable).with_name("infer")
        r = subprocess.run([str(exe), "serve", str(smollm2_path), "--port", str(port)], capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in r.stderr
