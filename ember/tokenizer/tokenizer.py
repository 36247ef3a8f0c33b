"""Tokenizer: a HF `tokenizers` object plus the BOS/EOS rules and chat template that go with a model."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from ember.errors import TokenizerError
from ember.tokenizer.length_bound import max_chars_per_token

# Above this many characters (or ids), encode/decode go through `tokenizers`' batch calls, which release the
# GIL (the single calls hold it): a server tokenizing a long text in a worker thread keeps serving meanwhile.
GIL_FREE_ABOVE = 8192

# (prefix, suffix, middle) token names: Qwen2.5-Coder, StarCoder, SantaCoder, DeepSeek-Coder, CodeLlama.
FIM_TOKEN_NAMES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),
    ("<PRE>", "<SUF>", "<MID>"),
)


def lone_surrogate(text: str) -> tuple[int, int] | None:
    """(index, code point) of the first lone UTF-16 surrogate in `text`, else None. JSON may escape half a
    surrogate pair ("\\ud800"), which Python decodes to a str no tokenizer can encode (it is no character)."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start, ord(text[err.start])
    return None


def _check_characters(text: str) -> None:
    """A lone surrogate is refused by name rather than failing inside `tokenizers`."""
    if (found := lone_surrogate(text)) is not None:
        index, surrogate = found
        raise TokenizerError(f"the text holds a lone UTF-16 surrogate U+{surrogate:04X} at character {index}, "
                             "which is not a character (JSON \\uD800-\\uDFFF escapes come in pairs)")


class Tokenizer:
    """Encodes and decodes text. BOS/EOS are added here (not by a post-processor) so every source —
    tokenizer.json or a GGUF vocabulary — follows the same rules."""

    def __init__(self, hf: HFTokenizer, *, bos_token: str | None, eos_token: str | None, eos_token_ids: set[int],
                 add_bos: bool, add_eos: bool = False, chat_template: str | None = None,
                 pad_token_id: int | None = None, fim_token_ids: tuple[int, int, int] | None = None,
                 normalize: Callable[[str], str] | None = None):
        self.hf = hf
        # A text normalization `tokenizers` cannot express, applied before it (a SentencePiece charsmap).
        self.normalize = normalize
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = hf.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = hf.token_to_id(eos_token) if eos_token else None
        self.eos_token_ids = set(eos_token_ids) | ({self.eos_token_id} if self.eos_token_id is not None else set())
        self.add_bos = add_bos and self.bos_token_id is not None
        self.add_eos = add_eos and self.eos_token_id is not None
        self.chat_template = chat_template
        self.pad_token_id = pad_token_id
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        self.fim_token_ids = fim_token_ids or self._named_fim_ids()

    def _named_fim_ids(self) -> tuple[int, int, int] | None:
        """Fill-in-the-middle prefix/suffix/middle tokens found by the names code models give them."""
        for names in FIM_TOKEN_NAMES:
            ids = [self.hf.token_to_id(name) for name in names]
            if None not in ids:
                return ids[0], ids[1], ids[2]
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text inside it becomes those tokens (as in transformers)."""
        _check_characters(text)
        if self.normalize is not None:
            text = self.normalize(text)
        if len(text) > GIL_FREE_ABOVE:
            ids = self.hf.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos:
                ids = [self.bos_token_id, *ids]
            if self.add_eos:
                ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if len(ids) > GIL_FREE_ABOVE:
            return self.hf.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def max_chars_per_token(self) -> int | None:
        """The most characters one token covers (ember.tokenizer.length_bound); None: no sound bound."""
        return max_chars_per_token(self.hf)

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text, add_special_tokens=False)), from the text's length alone."""
        per_token = self.max_chars_per_token
        return -(-len(text) // per_token) if per_token else 0

    def id_to_piece(self, token_id: int) -> str:
        return self.hf.id_to_token(token_id) or ""

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception subclasses for malformed files
            raise TokenizerError(f"{path}: unreadable tokenizer ({str(err).splitlines()[0][:200]})") from None
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        special_map = _read_json(directory / "special_tokens_map.json")
        bos = _token_text(config.get("bos_token", special_map.get("bos_token")))
        eos = _token_text(config.get("eos_token", special_map.get("eos_token")))
        added_bos, added_eos = _post_processor_additions(hf)
        hf.post_processor = None
        eos_ids = generation.get("eos_token_id")
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if isinstance(eos_ids, int) else [])
        pad = _token_text(config.get("pad_token"))
        return cls(
            hf, bos_token=bos, eos_token=eos, eos_token_ids=eos_ids,
            add_bos=bool(config.get("add_bos_token", added_bos)),
            add_eos=bool(config.get("add_eos_token", added_eos)),
            chat_template=_chat_template(directory, config),
            pad_token_id=hf.token_to_id(pad) if pad else None,
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _post_processor_additions(hf: HFTokenizer) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor adds a token before / after the text."""
    plain = hf.encode("a", add_special_tokens=False).ids
    full = hf.encode("a", add_special_tokens=True).ids
    if plain == full or not plain:
        return False, False
    start = full.index(plain[0]) if plain[0] in full else 0
    return start > 0, len(full) - start > len(plain)


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        return template
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = _read_json(directory / "chat_template.json")
    return json_file.get("chat_template") if isinstance(json_file.get("chat_template"), str) else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a model folder (tokenizer.json) or any GGUF file, vocabulary-only ones included."""
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    from ember.formats.gguf import GGUFFile, has_gguf_magic

    if path.is_file() and has_gguf_magic(path):
        from ember.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata

        with GGUFFile(path) as gguf:
            return tokenizer_from_gguf_metadata(gguf.metadata)
    raise TokenizerError(f"{path}: not a model folder or GGUF file")
