"""Sessions (save_state / load_state) and follow-up turns that prefill only their new tokens."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import infer
from gguf_fixtures import write_tiny
from infer.errors import StateError

GREEDY = infer.SamplingParams.greedy()
Q1 = [{"role": "user", "content": "What is the capital of France?"}]


def test_second_turn_prefills_only_new_tokens(smollm2):
    smollm2.engine.reset()
    r1 = smollm2.chat(Q1, max_tokens=24, sampling=GREEDY)
    n1 = len(smollm2.chat_tokens(Q1))
    assert r1.stats.cached_tokens == 0 and r1.stats.prefill_tokens == n1
    held = smollm2.n_tokens                          # prompt + the reply's tokens (not its end token)
    msgs = Q1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And of Italy?"}]
    ids2 = smollm2.chat_tokens(msgs)
    r2 = smollm2.chat(msgs, max_tokens=24, sampling=GREEDY)
    assert r2.stats.cached_tokens == held                      # all of turn one: prompt and reply
    assert r2.stats.prefill_tokens == len(ids2) - held < 20     # only "<|im_end|>\n<|im_start|>user\nAnd of Italy?..."
    assert r2.stats.prompt_tokens == len(ids2)


def test_save_load_continues_identically(smollm2_path, tmp_path):
    f = tmp_path / "s.session"
    sp = infer.SamplingParams(temperature=0.9, top_k=20)          # no seed: the session's generator
    with infer.LLM(smollm2_path, n_ctx=256, seed=5, sampling=sp, n_threads=1) as a:
        a.chat(Q1, max_tokens=12)
        msgs = Q1 + [{"role": "user", "content": "Tell me more."}]
        a.save_state(f, extra={"note": "hi", "n": [1, 2]})
        want = a.chat(msgs, max_tokens=16)
    with infer.LLM(smollm2_path, n_ctx=128, n_threads=1) as b:     # another n_ctx: fits, so it loads
        assert b.load_state(f) == {"note": "hi", "n": [1, 2]}
        assert b.sampling == sp
        got = b.chat(msgs, max_tokens=16)
    assert got.tokens == want.tokens and got.text == want.text
    assert got.stats.cached_tokens == want.stats.cached_tokens > 0    # the KV came from the file
    with np.load(f, allow_pickle=False) as z:
        header = json.loads(bytes(z["header"]))
        assert header["format"] == "infer-session" and header["version"] == 1
        assert header["cache"]["offset"] == header["n_tokens"] == len(z["tokens"])
        assert z["k"].shape == (30, 3, header["n_tokens"], 64)


def test_ring_session_after_wrap(smollm2_path, tmp_path):
    f = tmp_path / "ring.session"
    ids = list(range(1000, 1100))
    with infer.LLM(smollm2_path, n_ctx=48, context_policy="shift", n_keep=4, n_threads=1) as a:
        a.generate(ids, max_tokens=30, sampling=GREEDY)
        assert a.engine.kv.wrapped
        a.save_state(f)
        want = a.generate(a.engine.tokens + [1200], max_tokens=10, sampling=GREEDY)
    with infer.LLM(smollm2_path, n_ctx=48, context_policy="shift", n_keep=4, n_threads=1) as b:
        b.load_state(f)
        got = b.generate(b.engine.tokens + [1200], max_tokens=10, sampling=GREEDY)
        assert got.tokens == want.tokens and got.stats.prefill_tokens == 1
    for kw in (dict(n_ctx=48), dict(n_ctx=64, context_policy="shift", n_keep=4),
               dict(n_ctx=48, context_policy="shift", n_keep=2)):
        with infer.LLM(smollm2_path, n_threads=1, **kw) as c:
            with pytest.raises(StateError, match="wrapped"):
                c.load_state(f)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, smollm2_path):
    d = tmp_path_factory.mktemp("sessions")
    with infer.LLM(smollm2_path, n_ctx=128, n_threads=1) as llm:
        llm.generate("Once upon a time", max_tokens=8, sampling=GREEDY)
        llm.save_state(d / "good.session")
        n = llm.n_tokens
    return d, n


def refused(llm, path, *needles):
    before = list(llm.engine.tokens)
    with pytest.raises(StateError) as e:
        llm.load_state(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    for n in needles:
        assert n in msg, msg
    assert llm.engine.tokens == before                  # a refused file changes nothing
    return msg


def test_session_from_another_model_refused(saved, smollm2_path, tmp_path):
    d, _ = saved
    tiny = write_tiny(tmp_path / "tiny.gguf", smollm2_path)
    with infer.LLM(tiny, n_ctx=64) as other:
        refused(other, d / "good.session", "another model")
        other.save_state(tmp_path / "tiny.session")
    with infer.LLM(smollm2_path, n_ctx=128, n_threads=1) as llm:
        refused(llm, tmp_path / "tiny.session", "another model", "tiny.gguf")


def test_truncated_corrupt_inconsistent_refused(saved, smollm2, tmp_path):
    d, n = saved
    good = (d / "good.session").read_bytes()
    smollm2.generate("Hello", max_tokens=2, sampling=GREEDY)
    (tmp_path / "trunc.session").write_bytes(good[:len(good) // 2])
    refused(smollm2, tmp_path / "trunc.session", "truncated")
    (tmp_path / "text.session").write_text("not a session\n")
    refused(smollm2, tmp_path / "text.session")
    refused(smollm2, tmp_path / "missing.session", "no such")
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF                       # a bit flip inside the KV data: CRC
    (tmp_path / "flip.session").write_bytes(bytes(flipped))
    refused(smollm2, tmp_path / "flip.session")

    def rewrite(name, edit_header=None, edit_arrays=None):
        with np.load(d / "good.session", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = json.loads(bytes(arrays.pop("header")))
        if edit_header:
            edit_header(header)
        if edit_arrays:
            edit_arrays(arrays)
        p = tmp_path / name
        with open(p, "wb") as f:
            np.savez(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
        return p

    refused(smollm2, rewrite("count.session", lambda h: h.update(n_tokens=n + 3)), "tokens")
    refused(smollm2, rewrite("offset.session", lambda h: h["cache"].update(offset=n - 1)), "shape")
    refused(smollm2, rewrite("kshape.session", edit_arrays=lambda a: a.update(k=a["k"][:, :, :-1])), "shape")
    refused(smollm2, rewrite("kpos.session", edit_arrays=lambda a: a.update(kpos=a["kpos"][::-1].copy())),
            "positions")
    refused(smollm2, rewrite("version.session", lambda h: h.update(version=99)), "version")
    refused(smollm2, rewrite("model.session", lambda h: h["model"].update(fingerprint="0" * 64)), "another model")
    refused(smollm2, rewrite("rng.session", lambda h: h.update(rng={"bit_generator": "Nope"})), "sampler")
    refused(smollm2, rewrite("big.session", lambda h: h["cache"].update(offset=10 ** 6, pos=10 ** 6)))
    # an archive whose arrays would need pickle is refused, not unpickled
    p = tmp_path / "pickle.session"
    with np.load(d / "good.session", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["tokens"] = np.array([object()], dtype=object)
    np.savez(p, **arrays)
    refused(smollm2, p)
    assert zipfile.is_zipfile(d / "good.session")


def test_save_is_atomic(saved, smollm2, tmp_path, monkeypatch):
    p = tmp_path / "s.session"
    smollm2.generate("Hello", max_tokens=2, sampling=GREEDY)
    smollm2.save_state(p)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(infer.InferError, match="No space left"):
        smollm2.save_state(p)
    assert p.read_bytes() == before and [q.name for q in tmp_path.iterdir()] == ["s.session"]
