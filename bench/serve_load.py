#!/usr/bin/env python3
"""Concurrent streaming clients against `infer serve` and llama.cpp's `llama-server` on the same
file, threads and load, in one run: aggregate completion tokens/s with 1 client at a time and with
N at once, p50/p95 time to first token. OpenAI client over loopback.

    python bench/serve_load.py MODEL.gguf [--clients 8] [--tokens 64] [-t 2]
        [--llama-server /work/llamacpp/bin/llama-server]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai

PROMPTS = [f"Write a short story about a robot named Unit {i} who learns to paint." for i in range(64)]


def wait_up(base, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001
            time.sleep(0.5)
    raise SystemExit("server did not come up")


def one(client, prompt, n, out):
    t0 = time.perf_counter()
    ttft, toks = None, 0
    for ch in client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=n, temperature=0, stream=True,
                                             stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - t0
        if ch.usage:
            toks = ch.usage.completion_tokens
    out.append((ttft or 0.0, toks))


def load(base, clients, rounds, n):
    c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    one(c, "Hello", 4, [])                       # warm
    res = []
    t0 = time.perf_counter()
    k = 0
    for _ in range(rounds):
        ts = [threading.Thread(target=one, args=(c, PROMPTS[(k + i) % len(PROMPTS)], n, res)) for i in range(clients)]
        k += clients
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    dt = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in res)
    return sum(r[1] for r in res) / dt, statistics.median(ttfts), ttfts[int(0.95 * (len(ttfts) - 1))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--llama-server", default="/work/llamacpp/bin/llama-server")
    a = ap.parse_args()
    rows = []
    infer_exe = str(Path(sys.executable).with_name("infer"))
    servers = [("infer", [infer_exe, "serve", a.model, "--port", "{port}", "-np", str(a.clients), "-c", str(a.ctx),
                          "-t", str(a.threads)])]
    if os.path.exists(a.llama_server):
        servers.append(("llama.cpp", [a.llama_server, "-m", a.model, "--port", "{port}", "-np", str(a.clients),
                                      "-c", str(a.ctx), "-t", str(a.threads), "-fa", "on", "--log-disable"]))
    for name, cmd in servers:
        port = 18300 + len(rows)
        cmd = [x.replace("{port}", str(port)) for x in cmd]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_up(base, p)
            single = load(base, 1, 4, a.tokens)
            multi = load(base, a.clients, 2, a.tokens)
            rows.append((name, single, multi))
        finally:
            p.terminate()
            p.wait(20)
    print(f"model {a.model} | threads {a.threads} | {a.tokens} tokens per request, greedy, chat\n")
    print("| server | 1 client tok/s | %d clients tok/s | scaling | p50 TTFT (N) | p95 TTFT (N) |" % a.clients)
    print("|---|---:|---:|---:|---:|---:|")
    for name, s1, sn in rows:
        print(f"| {name} | {s1[0]:.1f} | {sn[0]:.1f} | {sn[0] / s1[0]:.2f}x | {sn[1] * 1000:.0f} ms | {sn[2] * 1000:.0f} ms |")
    if len(rows) == 2:
        print(f"\ninfer / llama.cpp aggregate at {a.clients} clients: {rows[0][2][0] / rows[1][2][0]:.2f}x; "
              f"1 client: {rows[0][1][0] / rows[1][1][0]:.2f}x")


if __name__ == "__main__":
    main()
