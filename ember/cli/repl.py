"""`ember run`'s interactive chat, after Ollama's REPL: readline line editing and history (kept in
<EMBER_HOME>/history), multi-line messages between triple quotes, and slash commands to change sampling
parameters, inspect or switch the model and save the conversation."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

HELP = '''commands:
  /set parameter NAME VALUE  sampling: temperature, top_p, top_k, min_p, num_predict (-1: no limit), seed,
                             stop (one or more strings), repeat_penalty, presence_penalty, frequency_penalty
  /set system TEXT           the system message of the conversation
  /show info|parameters|system
  /load MODEL                switch to another model (the conversation starts over)
  /save NAME                 save the conversation, system message, model and parameters as JSON in
                             <EMBER_HOME>/sessions/NAME.json
  /clear                     forget the conversation
  /bye                       exit (or Ctrl-D)
  """ ... """                a message of several lines
Ctrl-C stops a reply; Up/Down recall earlier lines.'''

# Ollama's parameter names -> SamplingParams fields and how to read the value
PARAMETERS = {
    "temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
    "min_p": ("min_p", float), "num_predict": ("max_tokens", int), "seed": ("seed", int),
    "repeat_penalty": ("repetition_penalty", float), "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float), "stop": ("stop", None),
}
SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_HISTORY = 1000


def ember_home() -> Path:
    from ember.store.store import ModelStore

    return ModelStore().root


@contextlib.contextmanager
def line_history():
    """readline's editing and a persistent history, where the platform has readline."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input()
        yield
        return
    path = ember_home() / "history"
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(MAX_HISTORY)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


def read_message() -> str | None:
    """One message from the user: a line, or the lines between triple quotes. None at end of input."""
    try:
        line = input(">>> ")
    except EOFError:
        print()
        return None
    if not line.lstrip().startswith('"""'):
        return line.strip()
    first = line.lstrip()[3:]
    if first.rstrip().endswith('"""'):
        return first.rstrip()[:-3].strip()
    lines = [first]
    while True:
        try:
            line = input("... ")
        except EOFError:
            print()
            return None
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip()
        lines.append(line)


def set_parameter(chat, words: list[str]) -> str:
    if len(words) < 2 or words[0] not in PARAMETERS:
        return f"usage: /set parameter NAME VALUE, NAME one of {', '.join(PARAMETERS)}"
    field, kind = PARAMETERS[words[0]]
    try:
        value = words[1:] if kind is None else kind(words[1])
    except ValueError:
        return f"{words[0]}: not a {kind.__name__}: {words[1]!r}"
    if field == "max_tokens" and value < 0:
        value = None  # Ollama's -1: until the context is full
    error = chat.set_option(field, value)
    return error or f"Set parameter '{words[0]}' to '{' '.join(words[1:])}'"


def show(chat, what: str) -> str:
    from ember.store.info import describe_path, format_params

    engine = chat.engine
    if what == "info":
        details = describe_path(engine.loaded.path)
        rows = [("model", engine.model_name), ("path", str(engine.loaded.path)), ("format", engine.loaded.format),
                ("architecture", details.get("architecture") or "-"),
                ("parameters", format_params(details.get("parameters"))),
                ("quantization", details.get("quant") or "-"), ("context", str(engine.max_model_len)),
                ("dtype", str(engine.loaded.dtype).removeprefix("torch.")), ("device", str(engine.device)),
                ("chat template", "yes" if engine.loaded.chat_template else "no (raw prompts)")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
    if what == "parameters":
        return "\n".join(f"  {name:<18} {chat.options.get(field)}" for name, (field, _) in PARAMETERS.items())
    if what == "system":
        return chat.system or "no system message"
    return "usage: /show info|parameters|system"


def save(chat, name: str) -> str:
    if not SESSION_NAME.match(name):
        return "usage: /save NAME (letters, digits, '.', '_' or '-'; at most 64)"
    path = ember_home() / "sessions" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    session = {"model": chat.engine.model_name, "system": chat.system, "parameters": chat.options,
               "messages": chat.history, "saved": int(time.time())}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(session, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return f"Saved the conversation to {path}"


def command(chat, text: str, load) -> str | None:
    """Run a slash command; the text to print (None: leave the REPL)."""
    from ember.errors import EmberError

    name, _, rest = text.partition(" ")
    words = rest.split()
    if name in ("/bye", "/exit", "/quit"):
        return None
    if name == "/clear":
        chat.clear()
        return "Cleared the conversation."
    if name in ("/help", "/?"):
        return HELP
    if name == "/set" and words[:1] == ["parameter"]:
        return set_parameter(chat, words[1:])
    if name == "/set" and words[:1] == ["system"]:
        chat.system = rest.strip()[len("system"):].strip() or None
        return "Set the system message." if chat.system else "Cleared the system message."
    if name == "/show":
        return show(chat, words[0] if words else "")
    if name == "/save":
        return save(chat, words[0] if len(words) == 1 else "")
    if name == "/load":
        if len(words) != 1:
            return "usage: /load MODEL"
        try:
            chat.switch(load(words[0]))
        except EmberError as err:
            return f"error: {err}"
        return f"Loaded {chat.engine.model_name}; the conversation starts over."
    return f"unknown command {name!r}: /help lists them"


def interactive(chat, load) -> None:
    """The REPL; `load(model)` makes an engine for /load."""
    print(f"ember · {chat.engine.model_name} · /help for commands, /bye to exit, Ctrl-C stops a reply")
    with line_history():
        while True:
            try:
                text = read_message()
            except KeyboardInterrupt:
                print("\nUse Ctrl-D or /bye to exit.")
                continue
            if text is None:
                return
            if not text:
                continue
            if text.startswith("/"):
                answer = command(chat, text, load)
                if answer is None:
                    return
                print(answer)
                continue
            chat.reply(text)
