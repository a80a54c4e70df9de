"""`infer chat`, driven as a person would: in a pseudo-terminal (pexpect), through a pipe, and with bad
input. The terminal session's transcript is printed (pytest -s shows it)."""
from __future__ import annotations

# a cold kernel cache adds the first-run notice line to stderr (cli/common.CompileNotice)
NOTICE = "compiling kernels for this CPU"
import os
import re
import subprocess
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[>=]|\r")
VERBOSE = r"\[prefill (\d+) new \+ (\d+) cached tokens"
SHOW = r"context: (\d+) tokens in the conversation \((\d+) messages, (\d+) turns\); KV cache (\d+)/"


def env(tmp_path):
    return {**os.environ, "PYTHONWARNINGS": "ignore", "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1",
            "INFER_HISTORY": str(tmp_path / "history"), "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def spawn(tmp_path, *args):
    child = pexpect.spawn(sys.executable, ["-m", "infer.cli", "chat", *map(str, args)], env=env(tmp_path),
                          encoding="utf-8", timeout=240, dimensions=(50, 250))
    return child


class Log:
    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    def text(self):
        """What the screen showed, roughly: escape sequences dropped, the prompt's redraws folded."""
        lines = ANSI.sub("", "".join(self.parts)).split("\n")
        return "\n".join(">>> " + ln.rsplit(">>>", 1)[1].strip() if ">>>" in ln else ln for ln in lines)


def turn(child, text):
    child.expect_exact(">>>")
    child.sendline(text)
    child.expect(VERBOSE)
    return int(child.match.group(1)), int(child.match.group(2))


def command(child, text, pattern):
    child.expect_exact(">>>")
    child.sendline(text)
    child.expect(pattern)
    return child.match


def test_repl_in_a_terminal(smollm2_path, tmp_path):
    session = tmp_path / "talk.session"
    child = spawn(tmp_path, smollm2_path, "-c", "2048", "-t", "1", "--temp", "0", "--seed", "1", "-n", "64",
                  "--verbose")
    log = Log()
    child.logfile_read = log
    try:
        child.expect("infer chat: .* /bye or Ctrl-D to leave")
        new1, cached1 = turn(child, "What is the capital of France?")
        assert cached1 == 0 and new1 > 10
        command(child, "/set temp 0.7", r"set temp = 0\.7")
        new2, cached2 = turn(child, "And of Italy?")
        assert cached2 > new1 and new2 < 20              # the first turn, reply included, came from the cache
        command(child, "/set max_tokens 600", r"set max_tokens = 600")
        child.expect_exact(">>>")
        child.sendline("Write a long story about a dragon who learns to fly.")
        child.expect_exact("learns to fly.")
        child.expect(r"(?s).{300}")                     # a good part of the reply has streamed ...
        child.sendintr()                                # ... Ctrl-C
        child.expect_exact("[stopped]")
        m = command(child, "/show", SHOW)
        conv, msgs, turns, cache = map(int, m.groups())
        # the cut reply is in the conversation and in the cache (all but the end-of-turn markup and the
        # last token sampled, not yet run)
        assert (msgs, turns) == (6, 3) and cache >= conv - 3
        new4, cached4 = turn(child, "Give the story a title.")
        assert cached4 >= conv - 3 and new4 < 25          # everything before, the cut reply too, was reused
        m = command(child, "/show", SHOW)
        conv2, msgs2, turns2, _ = map(int, m.groups())
        assert (msgs2, turns2) == (8, 4) and conv2 > conv
        command(child, f"/save {session}", "saved the session to")
        command(child, "/clear", "cleared the conversation")
        m = command(child, "/show", SHOW)
        assert m.group(2) == "0"
        command(child, f"/load {session}", r"loaded .*: 8 messages")
        m = command(child, "/show", SHOW)
        assert tuple(map(int, m.groups()[:3])) == (conv2, 8, 4)
        new5, cached5 = turn(child, "Thanks!")
        assert cached5 >= conv2 - 3 and new5 < 20         # the loaded KV was used
        command(child, "/?", r"/save FILE")
        child.expect_exact(">>>")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        print("\n----- transcript -----\n" + log.text() + "\n----- end -----")
        child.close(force=True)
    assert "Traceback" not in log.text()


def test_repl_exits_on_ctrl_c_and_ctrl_d_at_the_prompt(smollm2_path, tmp_path):
    for key in ("\x03", "\x04"):
        child = spawn(tmp_path, smollm2_path, "-c", "256", "-t", "1")
        child.expect_exact(">>>")
        child.send(key)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, (key, child.before)
        assert "Traceback" not in child.before


def run_chat(*args, stdin=""):
    e = {**os.environ, "PYTHONWARNINGS": "ignore", "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "infer.cli", "chat", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=e, timeout=600)


def test_piped_stdin_one_message_per_line(smollm2_path):
    r = run_chat(smollm2_path, "-c", "512", "-t", "1", "--temp", "0", "-n", "24",
                 stdin='What is the capital of France?\n"""What is the capital\nof Italy?"""\n/bye\nignored\n')
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert len(out) == 2 and "Paris" in out[0] and "Rome" in out[1]
    assert "Traceback" not in r.stderr and ">>>" not in r.stdout


@pytest.mark.parametrize("args,needle", [
    (("--context-policy", "shift", "--keep", "300", "-c", "256"), "keep"),
    (("--context-policy", "wrap",), "context policy"),
    (("--load", "/nonexistent/x.session"), "/nonexistent/x.session"),
    (("--temp", "-1"), "sampling"),
    (("-n", "0"), "max-tokens"),
])
def test_bad_options_one_line_error(smollm2_path, args, needle):
    r = run_chat(smollm2_path, "-c", "128", *args, stdin="hi\n")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(NOTICE)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_errors_inside_the_session_do_not_end_it(smollm2_path, tmp_path):
    (tmp_path / "junk.session").write_text("junk")
    r = run_chat(smollm2_path, "-c", "64", "-t", "1", "--temp", "0", "-n", "8",
                 stdin=f"/set temp hot\n/frobnicate\n/load {tmp_path / 'junk.session'}\n" + "word " * 80 + "\nHi\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errs) == 4, r.stderr            # bad value, unknown command, bad file, too long for the context
    assert "does not fit" in errs[3]
    assert r.stdout.strip()                     # "Hi" was still answered
