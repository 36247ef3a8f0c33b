"""`ember run`'s interactive chat driven through tmux (a real terminal: readline, Ctrl-C). Skipped, with the
reason, where tmux is missing (`make test` installs it from Debian when it can)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests.server_helpers import make_tiny_chat_model

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="REPL TEST SKIPPED: no tmux (apt-get install tmux)")


class Terminal:
    def __init__(self, command: str, env: dict[str, str]):
        self.socket = f"ember-test-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # The shell reports the exit status and stays, so the test can read it after /bye.
        script = f"env {exports} {command}; echo EXITED-$?; sleep 60"
        self._tmux("new-session", "-d", "-s", "repl", "-x", "160", "-y", "50", script)

    def _tmux(self, *args: str) -> str:
        return subprocess.run([TMUX, "-L", self.socket, *args], check=True, capture_output=True, text=True,
                              timeout=10).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-t", "repl", "-S", "-500")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "repl", *keys)

    def line(self, text: str) -> None:
        self._tmux("send-keys", "-t", "repl", "-l", text)
        self.keys("Enter")

    def wait(self, predicate, timeout: float = 60, what: str = "") -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; the terminal shows:\n{self.screen()}")

    def wait_prompts(self, count: int, timeout: float = 60) -> str:
        """Until `count` '>>> ' prompts were shown and the newest one is waiting for input."""
        return self.wait(lambda s: s.count(">>> ") >= count and s.rstrip().endswith(">>>"), timeout,
                         f"prompt #{count}")

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


def test_repl_in_a_terminal(tmp_path, testdata):
    model = make_tiny_chat_model(tmp_path / "tiny-chat", testdata)
    home = tmp_path / "home"
    env = {"HOME": str(home), "EMBER_HOME": str(home / ".ember"), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "TERM": "xterm", "EMBER_NATIVE_KERNELS": os.environ.get("EMBER_NATIVE_KERNELS", "1")}
    command = shlex.join([sys.executable, "-m", "ember.cli.main", "run", str(model), "--dtype", "float32",
                          "--max-model-len", "4096"])
    term = Terminal(command, env)
    try:
        screen = term.wait_prompts(1, 90)
        assert "loading tiny-chat from" in screen and "loaded tiny-chat in" in screen  # shown on a terminal

        term.line("/set parameter temperature 0")
        term.wait_prompts(2)
        term.line("/set parameter num_predict 6")
        term.wait_prompts(3)
        # History recall: Up twice brings back the /set temperature line, Enter runs it again.
        term.keys("Up")
        term.keys("Up")
        term.wait(lambda s: s.rstrip().endswith(">>> /set parameter temperature 0"), 10, "the recalled line")
        term.keys("Enter")
        screen = term.wait_prompts(4)
        assert screen.count("Set parameter 'temperature' to '0'") == 2

        # A message of several lines between triple quotes.
        term.line('"""')
        term.line("first line")
        term.line('second line"""')
        term.wait_prompts(5)

        # Ctrl-C mid-answer stops the reply and keeps the REPL.
        term.line("/set parameter num_predict -1")
        term.wait_prompts(6)
        term.line("Tell me a long story.")
        before = term.screen()
        term.wait(lambda s: len(s) > len(before) + 200, 60, "the long answer to stream")
        term.keys("C-c")
        screen = term.wait_prompts(7, 30)
        assert "[stopped]" in screen

        term.line("/save chat1")
        term.wait_prompts(8)
        term.line("/bye")
        term.wait(lambda s: "EXITED-" in s, 30, "the REPL to exit")
        assert "EXITED-0" in term.screen()
    finally:
        term.close()

    session = json.loads((home / ".ember" / "sessions" / "chat1.json").read_text())
    assert session["model"] == "tiny-chat" and session["parameters"]["temperature"] == 0.0
    assert session["parameters"]["max_tokens"] is None
    users = [m["content"] for m in session["messages"] if m["role"] == "user"]
    assert users == ["first line\nsecond line", "Tell me a long story."]
    stopped = session["messages"][-1]
    assert stopped["role"] == "assistant" and stopped["content"]
    history = (home / ".ember" / "history").read_text()
    assert "/set parameter temperature 0" in history and "/bye" in history
