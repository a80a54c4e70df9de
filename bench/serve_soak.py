#!/usr/bin/env python3
"""Soak: N streaming clients against `infer serve` for a fixed time (bounded: it stops by itself),
the server's resident memory sampled every few seconds; prints the RSS trace, its growth after
the first minute, requests done and errors.

    python bench/serve_soak.py MODEL.gguf [--clients 8] [--seconds 300] [-t 2]
"""
from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai


def rss_mib(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = str(Path(sys.executable).with_name("infer"))
    p = subprocess.Popen([exe, "serve", a.model, "--port", str(port), "-np", str(a.clients), "-c", str(1024 * a.clients),
                          "-t", str(a.threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except Exception:  # noqa: BLE001
            time.sleep(0.5)
    end = time.time() + a.seconds
    done, errors = [0], [0]

    def client(i):
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        rnd = random.Random(i)
        while time.time() < end:
            try:
                n = rnd.randint(8, 96)
                s = c.chat.completions.create(model="m", stream=True, max_tokens=n, temperature=0.8,
                                              messages=[{"role": "user", "content": f"Tell me about topic {rnd.randint(0, 10 ** 6)}."}])
                for k, _ in enumerate(s):
                    if rnd.random() < 0.02:           # some clients drop their stream mid-way
                        s.close()
                        break
                done[0] += 1
            except Exception:  # noqa: BLE001
                errors[0] += 1
    ts = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
    for t in ts:
        t.start()
    trace = []
    t0 = time.time()
    while time.time() < end:
        trace.append((time.time() - t0, rss_mib(p.pid)))
        time.sleep(5)
    for t in ts:
        t.join(150)
    p.terminate()
    rc = p.wait(20)
    print(" ".join(f"{t:.0f}s:{r:.0f}" for t, r in trace))
    after = [r for t, r in trace if t >= 60]
    if after:
        print(f"RSS after the first minute: {min(after):.0f} .. {max(after):.0f} MiB "
              f"(growth {after[-1] - after[0]:+.0f} MiB over {trace[-1][0] - 60:.0f} s)")
    print(f"requests {done[0]}, errors {errors[0]}, server exit status {rc}")


if __name__ == "__main__":
    main()
