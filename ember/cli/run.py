"""`ember run [MODEL] [PROMPT]`: one-shot generation streamed to stdout, or an interactive chat."""

from __future__ import annotations

import argparse
import gc
import itertools
import sys

from ember.cli.options import (
    add_model_options,
    add_sampling_options,
    engine_args,
    existing_adapters,
    sampling_kwargs,
)


def add_parser(sub) -> None:
    parser = sub.add_parser("run", help="chat with a model, or complete one prompt",
                            description="Chat with a model interactively, or answer PROMPT and exit.")
    parser.add_argument("model", nargs="?", default=None,
                        help="GGUF file, model folder or model name from `ember ls --all` (default: the bundled model)")
    parser.add_argument("prompt", nargs="*", help="answer this and exit (reads stdin when it is '-')")
    parser.add_argument("--system", default=None, help="system message for the chat")
    parser.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    parser.add_argument("--format", default=None, metavar="FORMAT",
                        help='constrain every reply: "json" (a JSON object) or a JSON schema (inline, or a .json file)')
    add_model_options(parser, "one sequence of the full context",
                      lora="a LoRA adapter to chat with (a PEFT folder or a GGUF LoRA file; docs/lora.md)")
    add_sampling_options(parser)


class Chat:
    """Streams replies from the engine, keeping the conversation for the chat template. `options` are the
    SamplingParams fields of every reply (the REPL's /set parameter changes them); `structured`, --format's
    constraint on every reply."""

    def __init__(self, engine, options: dict, system: str | None, raw: bool, structured=None):
        self.engine = engine
        self.options = dict(options)
        self.structured = structured
        self.system = system
        self.forced_raw = raw
        self.raw = raw or engine.loaded.chat_template is None
        self.history: list[dict] = []
        self._ids = itertools.count()

    def clear(self) -> None:
        self.history = []

    def set_option(self, field: str, value) -> str | None:
        """Change one sampling field; the error, if the value is not valid (the old one stays)."""
        from ember.errors import EmberError
        from ember.sampling_params import SamplingParams

        try:
            SamplingParams(**{**self.options, field: value})
        except EmberError as err:
            return f"error: {err}"
        self.options[field] = value
        return None

    def switch(self, engine) -> None:
        """Chat with `engine` from now on; the conversation starts over and the old engine's memory is freed."""
        self.engine = None
        gc.collect()
        self.engine = engine
        self.raw = self.forced_raw or engine.loaded.chat_template is None
        self.clear()

    def _prompt_ids(self, text: str) -> list[int]:
        tokenizer = self.engine.tokenizer
        if self.raw:
            return tokenizer.encode(text)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": text})
        rendered = self.engine.loaded.chat_template.render(messages, add_generation_prompt=True)
        return tokenizer.encode(rendered, add_special_tokens=False)

    def reply(self, text: str) -> str:
        """Stream the answer to `text`; Ctrl-C ends the reply early and keeps what was said."""
        out = sys.stdout  # looked up per reply, not bound at import: tests and callers may redirect it
        request_id = f"run-{next(self._ids)}"
        from ember.sampling_params import SamplingParams

        params = SamplingParams(**self.options, structured=self.structured)
        self.engine.add_request(request_id, self._prompt_ids(text), params)
        answer: list[str] = []
        try:
            finished = False
            while not finished:
                for step in self.engine.step():
                    if step.request_id == request_id:
                        answer.append(step.text_delta)
                        out.write(step.text_delta)
                        out.flush()
                        finished = step.finished
        except KeyboardInterrupt:
            self.engine.abort(request_id)
            out.write("\n[stopped]")
        out.write("\n")
        reply = "".join(answer)
        if not self.raw:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply


def reply_format(text: str | None):
    """--format as a StructuredOutput: "json", a schema's JSON text, or the path of a file holding one."""
    import json
    from pathlib import Path

    from ember.errors import InvalidParameter
    from ember.sampling_params import StructuredOutput

    if text is None:
        return None
    if text == "json":
        return StructuredOutput("json_object")
    path = Path(text)
    if not text.lstrip().startswith("{") and path.is_file():
        text = path.read_text(encoding="utf-8")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidParameter("--format", f'expected "json", a JSON schema or a schema file ({err})') from None
    if not isinstance(schema, dict):
        raise InvalidParameter("--format", "a JSON schema must be an object")
    return StructuredOutput("json_schema", json.dumps(schema))


def run(args: argparse.Namespace) -> int:
    from ember.cli.loading import load_engine
    from ember.cli.repl import interactive
    from ember.engine.engine import EngineArgs
    from ember.errors import InvalidParameter
    from ember.sampling_params import SamplingParams

    options = sampling_kwargs(args)
    structured = reply_format(args.format)
    SamplingParams(**options)  # a bad value fails here, before the model loads
    prompt = " ".join(args.prompt)
    if prompt == "-":
        prompt = sys.stdin.read()
    # One stream: its KV cache holds one full context, not the batching default of max_num_seqs of them.
    engine_options = engine_args(args, max_num_seqs=1, threads=args.threads)
    EngineArgs(**engine_options)
    adapters = existing_adapters(engine_options["lora"])
    if len(adapters) > 1:
        raise InvalidParameter("--lora", "ember run chats with one adapter")
    if adapters:
        options["lora"] = adapters[0].name
    engine = load_engine(args.model, engine_options)
    if structured is not None:
        engine.grammars.compile(structured, "--format")  # a bad schema fails here, before any prompt
    chat = Chat(engine, options, args.system, args.raw, structured)
    if prompt:
        chat.reply(prompt)
    elif sys.stdin.isatty():
        interactive(chat, lambda model: load_engine(model, engine_options))
    else:  # piped input without a prompt: one reply per non-empty line, like a scripted chat
        for line in sys.stdin:
            if line.strip() and line.strip() != "/bye":
                chat.reply(line.strip())
    return 0
