"""`infer serve MODEL`: an OpenAI-compatible HTTP server (runtime/serve)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import common


def register(app: typer.Typer):
    @app.command("serve")
    def serve(
        model: Optional[Path] = common.Model,
        host: str = typer.Option("127.0.0.1", "--host", envvar="INFER_HOST", help="Address to listen on."),
        port: int = typer.Option(8080, "--port", envvar="INFER_PORT", help="TCP port."),
        parallel: int = typer.Option(4, "-np", "--parallel", envvar="INFER_PARALLEL",
                                     help="Sequences decoded at once (each step reads the weights once for all)."),
        ctx: Optional[int] = typer.Option(None, "-c", "--ctx", envvar="INFER_CTX",
                                          help="KV tokens for all sequences together (default 2048 each); "
                                               "each sequence gets ctx / parallel."),
        threads: Optional[int] = common.Threads,
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="INFER_API_KEY",
                                              help="Require 'Authorization: Bearer KEY' on /v1/*."),
        queue: int = typer.Option(64, "--queue", help="Requests that may wait for a slot; more get 503."),
        prefix_cache_mb: float = typer.Option(256, "--prefix-cache-mb",
                                              help="Memory for cached prompt prefixes beyond the slots' own."),
        context_policy: str = typer.Option("stop", "--context-policy", help="stop | shift (per sequence)."),
        batch_invariant: bool = typer.Option(False, "--batch-invariant",
                                             help="Run every step on the batched kernels, a lone sequence's too: a "
                                                  "stream's text then never depends on the load (one stream decodes "
                                                  "slower)."),
        draft: Optional[Path] = common.Draft,
        draft_max: int = common.DraftMax,
        lookup: int = common.Lookup,
    ):
        """Serve MODEL over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models,
        /health, /metrics). With --draft or --lookup, a sequence running alone is decoded
        speculatively (the same text, sooner)."""
        from infer.errors import InferError
        if parallel < 1 or queue < 0 or not 0 < port < 65536:
            raise InferError("--parallel must be >= 1, --queue >= 0 and --port in 1..65535")
        model = common.resolve_model(model)
        notice = common.CompileNotice(start=True)
        from infer import serve as srv
        try:
            srv.run(model, host, port, parallel, ctx, threads, api_key, queue, prefix_cache_mb, context_policy,
                    on_ready=notice.done, batch_invariant=batch_invariant, draft=draft, lookup=lookup,
                    draft_max=draft_max)
        finally:
            notice.done()
