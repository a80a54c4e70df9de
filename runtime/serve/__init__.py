"""`infer serve`: the OpenAI-compatible server (app.py) on uvicorn."""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("infer.serve")


def build(path, parallel: int = 4, n_ctx: int | None = None, n_threads: int | None = None,
          api_key: str | None = None, max_queue: int = 64, prefix_cache_mb: float = 256,
          context_policy: str = "stop", int8_activations: bool = True, warm: bool = True,
          batch_invariant: bool = False, draft=None, lookup: int = 0, draft_max: int = 8):
    """Open the model, start the engine (kernels compiled before the first request when warm)
    and return (server, engine, llm). draft / lookup / draft_max: speculative decoding while one
    sequence runs alone (infer.speculative)."""
    from ..api import LLM
    from ..batch import BatchEngine
    from .app import Server
    total = n_ctx or 2048 * parallel
    llm = LLM(path, n_ctx=max(8, total // max(1, parallel)), n_threads=n_threads,
              int8_activations=int8_activations, draft=draft, lookup=lookup, draft_max=draft_max)
    try:
        eng = BatchEngine(llm, parallel=parallel, n_ctx=total, policy=context_policy, max_queue=max_queue,
                          prefix_cache_mb=prefix_cache_mb, batch_invariant=batch_invariant)
        if warm:        # compile (or load) every kernel a request runs: prompt chunk, batched and lone steps
            bos = llm.tokenizer.bos_id if llm.tokenizer.bos_id is not None and llm.tokenizer.bos_id >= 0 else 0
            for fused in (False, not batch_invariant):
                eng.fused_single = fused
                eng.generate([bos] * 2, max_tokens=2)
            if eng.drafters:        # the verify pass's kernels (all-token logits), and a draft model's
                eng.generate([bos] * 4, max_tokens=12)
    except BaseException:
        llm.close()
        raise
    model_id = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return Server(eng, model_id, api_key), eng, llm


def _spec_label(llm) -> str:
    sp = llm.speculative
    if sp is None:
        return ""
    src = [f"lookup {sp.lookup}"] if sp.lookup else []
    if sp.draft is not None:
        src.append(f"draft {os.path.basename(os.fspath(getattr(sp.draft, 'path', sp.draft)))}")
    return f"speculative ({', '.join(src)}, up to {sp.draft_max}) for a lone sequence | "


def _uvicorn_class():
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the SIGINT/SIGTERM it shut down on, so the process dies of it (status
        -15); a server that was asked to stop and drained or cancelled its requests exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    getattr(self, "_captured_signals", []).clear()
    return Server


def run(path, host: str = "127.0.0.1", port: int = 8080, parallel: int = 4, n_ctx: int | None = None,
        n_threads: int | None = None, api_key: str | None = None, max_queue: int = 64,
        prefix_cache_mb: float = 256, context_policy: str = "stop", graceful_s: float = 5.0, on_ready=None,
        batch_invariant: bool = False, draft=None, lookup: int = 0, draft_max: int = 8):
    import socket

    import uvicorn

    from ..errors import InferError
    try:        # before the model loads: a port in use is a one-line error, not a log line later
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise InferError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    _Uvicorn = _uvicorn_class()
    server, eng, llm = build(path, parallel, n_ctx, n_threads, api_key, max_queue, prefix_cache_mb, context_policy,
                             batch_invariant=batch_invariant, draft=draft, lookup=lookup, draft_max=draft_max)
    if on_ready is not None:
        on_ready()
    print(f"infer serve: {path} | {parallel} sequences x {eng.seq_ctx} tokens, KV pool "
          f"{eng.kv_bytes / 2**20:.0f} MiB, prefix cache up to {prefix_cache_mb:.0f} MiB | {llm.n_threads} threads | "
          + ("batch-invariant | " if batch_invariant else "") + _spec_label(llm) + f"http://{host}:{port}/v1"
          + (" | API key required" if api_key else ""), file=sys.stderr, flush=True)
    config = uvicorn.Config(server, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=graceful_s, lifespan="off")
    srv = _Uvicorn(config)
    try:
        srv.run()
    finally:
        eng.close()
        llm.close()
    print("infer serve: stopped", file=sys.stderr, flush=True)
