"""An OpenAI-compatible HTTP API over the BatchEngine, on starlette (served by uvicorn).

POST /v1/chat/completions, POST /v1/completions (SSE streaming or not), GET /v1/models,
GET /health, GET /metrics (Prometheus text). Errors have OpenAI's shape
{"error": {"message", "type", "param", "code"}}: 400 bad JSON or fields, 401 wrong API key, 404,
503 queue full; never a traceback. The server keeps no state between requests beyond the
engine's prefix cache, so replicas can run behind any HTTP balancer.
"""
from __future__ import annotations

import json
import logging
import math
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..batch import BatchEngine, QueueFullError
from ..errors import ContextError, InferError
from ..sampling import SamplingParams

log = logging.getLogger("infer.serve")

ROLES = ("system", "developer", "user", "assistant", "tool")
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)


class BadRequest(Exception):
    def __init__(self, message, status=400, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code


def error(message, status=400, type_="invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.n = 0
        self.sum = 0.0

    def observe(self, v):
        self.n += 1
        self.sum += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name, help_):
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]
        return out


# --- request validation ---------------------------------------------------------------------------
def _field(body, name, kinds, default=None, check=None, what=None):
    if name not in body or body[name] is None:
        return default
    v = body[name]
    # bool is an int in Python: never accept it for a number
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise BadRequest(f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}", param=name)
    if isinstance(v, float) and not math.isfinite(v):
        raise BadRequest(f"'{name}' must be a finite number", param=name)
    if check is not None and not check(v):
        raise BadRequest(f"'{name}' is out of range: {v!r} ({what})", param=name)
    return v


def sampling_of(body) -> SamplingParams:
    num = (int, float)
    temp = _field(body, "temperature", num, 0.8, lambda v: 0 <= v <= 2, "a number from 0 to 2")
    top_p = _field(body, "top_p", num, 0.95, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _field(body, "top_k", (int,), 40, lambda v: v >= 0, "an integer >= 0")
    min_p = _field(body, "min_p", num, 0.05, lambda v: 0 <= v <= 1, "a number from 0 to 1")
    rep = _field(body, "repeat_penalty", num, 1.0, lambda v: 0 < v <= 10, "a number in (0, 10]")
    seed = _field(body, "seed", (int,), None, None, "an integer")
    return SamplingParams(temperature=float(temp), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                          repeat_penalty=float(rep), seed=seed)


def common_fields(body, default_max):
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    n = _field(body, "n", (int,), 1, lambda v: v == 1, "only n = 1 is supported")
    del n
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _field({"max_tokens": mt}, "max_tokens", (int,), default_max, lambda v: v >= 1, "an integer >= 1")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop)):
        raise BadRequest("'stop' must be a string or a list of at most 16 strings", param="stop")
    stream = _field(body, "stream", (bool,), False, None, "a boolean")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    usage = bool(so and so.get("include_usage"))
    return max_tokens, stop, stream, usage, sampling_of(body)


def messages_of(body):
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)} (got {role!r})", param="messages")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):       # content parts: only text
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise BadRequest(f"messages[{i}].content parts must be {{'type': 'text', 'text': str}}",
                                     param="messages")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", param="messages")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def prompt_of(body):
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise BadRequest("'prompt' is empty", param="prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p                            # token ids
    raise BadRequest("'prompt' must be a non-empty string, a list of one string, or a list of token ids",
                     param="prompt")


# --- the app --------------------------------------------------------------------------------------
class Server:
    def __init__(self, engine: BatchEngine, model_id: str, api_key: str | None = None):
        self.engine = engine
        self.model_id = model_id
        self.api_key = api_key or None
        self.created = int(time.time())
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tps = Histogram(TPS_BUCKETS)
        self.http = {}                      # (path, status) -> count
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed, Exception: self._internal})

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            status = {}

            async def send2(msg):
                if msg["type"] == "http.response.start":
                    status["s"] = msg["status"]
                await send(msg)
            path = scope.get("path", "")
            if path.startswith("/v1/") and self.api_key is not None:
                auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                if auth != f"Bearer {self.api_key}":
                    resp = error("invalid or missing API key (Authorization: Bearer KEY)", 401,
                                 "authentication_error", code="invalid_api_key")
                    await resp(scope, receive, send2)
                    self._count(path, 401)
                    return
            await self.app(scope, receive, send2)
            self._count(path, status.get("s", 0))
            return
        await self.app(scope, receive, send)

    def _count(self, path, status):
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"):
            path = "other"
        self.http[(path, status)] = self.http.get((path, status), 0) + 1

    async def _not_found(self, request, exc):
        return error(f"no route {request.url.path}", 404, code="not_found")

    async def _not_allowed(self, request, exc):
        return error(f"{request.method} is not allowed on {request.url.path}", 405, code="method_not_allowed")

    async def _internal(self, request, exc):
        log.exception("internal error")
        return error("internal server error", 500, "server_error")

    async def _body(self, request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON ({e})") from None

    # endpoints -----------------------------------------------------------------------------------
    async def health(self, request):
        return JSONResponse({"status": "ok", "slots_idle": self.engine.parallel - self.engine.active,
                             "slots_busy": self.engine.active, "queue": self.engine.queue_depth})

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "infer"}]})

    async def metrics(self, request):
        e, m = self.engine, self.engine.metrics
        L = [
            "# HELP infer_requests_total Generation requests accepted.", "# TYPE infer_requests_total counter",
            f"infer_requests_total {m.requests}",
            "# HELP infer_requests_finished_total Requests finished, by finish reason.",
            "# TYPE infer_requests_finished_total counter",
            *[f'infer_requests_finished_total{{reason="{r}"}} {c}' for r, c in sorted(m.finished.items())],
            "# HELP infer_prompt_tokens_total Prompt tokens of finished requests.",
            "# TYPE infer_prompt_tokens_total counter", f"infer_prompt_tokens_total {m.prompt_tokens}",
            "# HELP infer_prompt_tokens_cached_total Prompt tokens reused from the prefix cache.",
            "# TYPE infer_prompt_tokens_cached_total counter", f"infer_prompt_tokens_cached_total {m.cached_tokens}",
            "# HELP infer_completion_tokens_total Generated tokens of finished requests.",
            "# TYPE infer_completion_tokens_total counter", f"infer_completion_tokens_total {m.completion_tokens}",
            "# HELP infer_decode_steps_total Batched decode steps.", "# TYPE infer_decode_steps_total counter",
            f"infer_decode_steps_total {m.steps}",
            "# HELP infer_decode_rows_total Sequences decoded, summed over steps.",
            "# TYPE infer_decode_rows_total counter", f"infer_decode_rows_total {m.batch_rows}",
            "# HELP infer_draft_tokens_total Tokens drafted (speculative decoding of a lone sequence).",
            "# TYPE infer_draft_tokens_total counter", f"infer_draft_tokens_total {m.drafted}",
            "# HELP infer_draft_tokens_accepted_total Drafted tokens the model agreed with.",
            "# TYPE infer_draft_tokens_accepted_total counter", f"infer_draft_tokens_accepted_total {m.accepted}",
            "# HELP infer_queue_depth Requests waiting for a slot.", "# TYPE infer_queue_depth gauge",
            f"infer_queue_depth {e.queue_depth}",
            "# HELP infer_slots_busy Sequences running.", "# TYPE infer_slots_busy gauge", f"infer_slots_busy {e.active}",
            "# HELP infer_slots_total Sequences the engine runs at once.", "# TYPE infer_slots_total gauge",
            f"infer_slots_total {e.parallel}",
            "# HELP infer_kv_pool_bytes KV cache pool size.", "# TYPE infer_kv_pool_bytes gauge",
            f"infer_kv_pool_bytes {e.kv_bytes}",
            "# HELP infer_prefix_cache_bytes Prefix store size.", "# TYPE infer_prefix_cache_bytes gauge",
            f"infer_prefix_cache_bytes {e.store.nbytes}",
            *self.ttft.lines("infer_ttft_seconds", "Time from request to first token."),
            *self.tps.lines("infer_decode_tokens_per_second", "Decode speed per request."),
            "# HELP infer_http_requests_total HTTP requests by path and status.",
            "# TYPE infer_http_requests_total counter",
            *[f'infer_http_requests_total{{path="{p}",status="{s}"}} {c}' for (p, s), c in sorted(self.http.items())],
        ]
        return PlainTextResponse("\n".join(L) + "\n", media_type="text/plain; version=0.0.4")

    async def chat(self, request):
        return await self._generate(request, chat=True)

    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            body = await self._body(request)
            max_tokens, stop, stream, usage, sampling = common_fields(body, 512 if chat else 16)
            src = messages_of(body) if chat else prompt_of(body)
            eng = self.engine
            try:
                ids = await run_in_threadpool(
                    lambda: eng.prompt_ids(eng.chat_ids(src) if chat else src))
            except ContextError as e:
                raise BadRequest(str(e), code="context_length_exceeded") from None
            except InferError as e:
                raise BadRequest(str(e)) from None
            gen = eng.astream(ids, max_tokens, sampling, stop)
            first = await gen.__anext__()      # queue full / engine errors surface here, before a 200
        except BadRequest as e:
            return error(str(e), e.status, e.type, e.param, e.code)
        except QueueFullError as e:
            return error(f"server busy: {e}", 503, "server_error", code="queue_full")
        except InferError as e:
            return error(str(e), 500, "server_error")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            return StreamingResponse(self._sse(gen, first, rid, created, chat, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts, c = [first.text], first
        try:
            while c.finish_reason is None:
                c = await gen.__anext__()
                parts.append(c.text)
        finally:
            await gen.aclose()
        self._observe(c)
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": _reason(c.finish_reason)} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": _reason(c.finish_reason)})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": self.model_id, "choices": [choice],
                             "usage": _usage(c.stats)})

    async def _sse(self, gen, first, rid, created, chat, usage):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(text, reason, role=False):
            if chat:
                delta = {"role": "assistant", "content": text} if role else ({"content": text} if text or not reason else {})
                ch = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                ch = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            d = {"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [ch]}
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"
        c = first
        try:
            if chat:
                yield event("", None, role=True)
            while True:
                reason = _reason(c.finish_reason)
                if c.text or reason is None:
                    if c.text:
                        yield event(c.text, None)
                if reason is not None:
                    yield event("", reason)
                    self._observe(c)
                    if usage:
                        d = {"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [],
                             "usage": _usage(c.stats)}
                        yield f"data: {json.dumps(d)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                c = await gen.__anext__()
        finally:
            await gen.aclose()              # a client that went away cancels its sequence

    def _observe(self, c):
        st = c.stats
        if st is not None and st.generated_tokens:
            self.ttft.observe(st.ttft_s)
            if st.decode_tps:
                self.tps.observe(st.decode_tps)


def _reason(r):
    return {"context": "length", "cancelled": "stop"}.get(r, r)


def _usage(st):
    if st is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens,
            "total_tokens": st.prompt_tokens + st.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": st.cached_tokens}}
