"""ember's Tokenizer encodes, decodes and reads BOS/EOS/chat templates like transformers' AutoTokenizer."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

import ember
from ember.errors import TokenizerError
from tests.conftest import SHARED

TINY_LLAMA = SHARED / "gguf" / "tiny-llama-hf"

TEXTS = [
    "Hello world",
    " Hello",
    "  two leading spaces",
    "\n\nnewlines\n",
    "tab\there\r\nCRLF",
    "日本語のテキスト",
    "emoji 🙂🚀 done 👨‍👩‍👧",
    "Crème brûlée à la carte",
    "Ελληνικά и кириллица",
    "zero\u200bwidth and ünïcödé",
    "1234567890 + 3.14 = x",
    "def f(x):\n    return x * 2\n",
    "",
    " ",
    "<0x41> ▁literal",
]
SPECIAL_TEXTS = {  # special-token text inside ordinary text
    "llama": ["<s> inside </s> text", "a<s>b", "<unk>", "</s>"],
    "bpe": ["<|begin|>x<|endoftext|>", "a<tool>b", "<|pad|> padded", "<|endoftext|>"],
}
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["Hello world, this is a tiny corpus for a tiny tokenizer.", "日本語のテキスト 🙂 emoji 🚀",
          "Crème brûlée à la carte", "def f(x):\n    return x * 2\n", "  spaces\t\ttabs\n\n"] * 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@functools.cache
def _auto_tokenizer(directory: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def build_byte_level_bpe(directory: Path, *, bos: bool, eos: bool, config_flags: bool = True,
                         template_file: bool = False) -> Path:
    """A GPT-2 style byte-level BPE folder whose tokenizer.json post-processor and config agree on BOS/EOS."""
    tok = HFTokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|begin|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(["<tool>"])  # an added token that is not special
    if bos or eos:
        single = " ".join([*(["<|begin|>"] if bos else []), "$A", *(["<|endoftext|>"] if eos else [])])
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B:1",
            special_tokens=[(t, tok.token_to_id(t)) for t in ("<|begin|>", "<|endoftext|>")])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin|>", "eos_token": "<|endoftext|>",
              "pad_token": "<|pad|>"}
    if config_flags:
        config.update(add_bos_token=bos, add_eos_token=eos)
    if template_file:
        (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    else:
        config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


BPE_VARIANTS = {
    "bos": {"bos": True, "eos": False},
    "bos_eos": {"bos": True, "eos": True},
    "plain": {"bos": False, "eos": False},
    "bos_from_post_processor": {"bos": True, "eos": False, "config_flags": False},
    "template_file": {"bos": True, "eos": False, "template_file": True},
}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    dirs = {"tiny-llama": (TINY_LLAMA, "llama")}
    for name, options in BPE_VARIANTS.items():
        dirs[name] = (build_byte_level_bpe(tmp_path_factory.mktemp(name), **options), "bpe")
    return dirs


ALL_DIRS = ["tiny-llama", *BPE_VARIANTS]


def _pair(tokenizer_dirs, name):
    directory, kind = tokenizer_dirs[name]
    if not directory.is_dir():
        pytest.skip("shared test data not present")
    return ember.load_tokenizer(directory), _auto_tokenizer(directory), kind


@pytest.mark.parametrize("name", ALL_DIRS)
def test_encode_matches_transformers(tokenizer_dirs, name):
    ours, theirs, kind = _pair(tokenizer_dirs, name)
    for text in TEXTS + SPECIAL_TEXTS[kind]:
        for add_special_tokens in (True, False):
            want = theirs.encode(text, add_special_tokens=add_special_tokens)
            assert ours.encode(text, add_special_tokens=add_special_tokens) == want, (text, add_special_tokens)


@pytest.mark.parametrize("name", ALL_DIRS)
def test_decode_matches_transformers(tokenizer_dirs, name):
    ours, theirs, kind = _pair(tokenizer_dirs, name)
    special = [i for i in (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) if i is not None]
    for text in TEXTS + SPECIAL_TEXTS[kind]:
        ids = theirs.encode(text, add_special_tokens=True)
        for sequence in (ids, [*special, *ids, *special], ids[1:] + special + ids[:1]):
            for skip in (True, False):
                want = theirs.decode(sequence, skip_special_tokens=skip)
                assert ours.decode(sequence, skip_special_tokens=skip) == want, (text, sequence, skip)


@pytest.mark.parametrize("name", ALL_DIRS)
def test_special_tokens_match_transformers(tokenizer_dirs, name):
    ours, theirs, _ = _pair(tokenizer_dirs, name)
    assert ours.bos_token == theirs.bos_token and ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token == theirs.eos_token and ours.eos_token_id == theirs.eos_token_id
    assert ours.eos_token_id in ours.eos_token_ids
    assert ours.pad_token_id == theirs.pad_token_id
    assert ours.vocab_size == len(theirs)
    for token_id in (theirs.bos_token_id, theirs.eos_token_id):
        assert ours.is_special(token_id)
    assert ours.id_to_piece(theirs.bos_token_id) == theirs.bos_token
    for token_id in (10, 100, 300):
        assert ours.id_to_piece(token_id) == theirs.convert_ids_to_tokens(token_id)


def test_bos_eos_rules(tokenizer_dirs):
    for name, options in BPE_VARIANTS.items():
        ours, _, _ = _pair(tokenizer_dirs, name)
        assert (ours.add_bos, ours.add_eos) == (options["bos"], options["eos"]), name
        ids = ours.encode("Hello")
        assert (ids[0] == ours.bos_token_id) == options["bos"]
        assert (ids[-1] == ours.eos_token_id) == options["eos"]
        assert ours.encode("Hello", add_special_tokens=False) == ids[int(options["bos"]):len(ids) - options["eos"]]


@pytest.mark.parametrize("name", BPE_VARIANTS)
def test_chat_template_matches_transformers(tokenizer_dirs, name):
    ours, theirs, _ = _pair(tokenizer_dirs, name)
    assert ours.chat_template == theirs.chat_template == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    template = ember.ChatTemplate(ours.chat_template, bos_token=ours.bos_token, eos_token=ours.eos_token)
    for add_generation_prompt in (True, False):
        want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        got = template.render(messages, add_generation_prompt=add_generation_prompt)
        assert got == want
        # The rendered prompt already holds BOS: tokenized without special tokens it equals transformers' ids.
        want_ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if isinstance(want_ids, dict) or hasattr(want_ids, "input_ids"):
            want_ids = want_ids["input_ids"]
        assert ours.encode(got, add_special_tokens=False) == list(want_ids)


def test_config_flag_overrides_post_processor(tmp_path):
    """Where tokenizer_config.json and tokenizer.json disagree, ember follows the config's add_bos_token (as
    llama.cpp's converter and transformers 4 do; transformers 5 ignores the flag when tokenizer.json exists)."""
    directory = build_byte_level_bpe(tmp_path / "disagree", bos=True, eos=False)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ours = ember.load_tokenizer(directory)
    assert not ours.add_bos
    assert ours.encode("Hello") == ours.encode("Hello", add_special_tokens=False)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError):
        ember.load_tokenizer(tmp_path)  # no tokenizer.json
    with pytest.raises(TokenizerError):
        ember.load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError):
        ember.load_tokenizer(tmp_path)
    good = build_byte_level_bpe(tmp_path / "good", bos=False, eos=False)
    (good / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError):
        ember.load_tokenizer(good)


def test_lone_surrogate_is_refused_by_name(tokenizer_dirs):
    """JSON's "\\ud800" decodes to a str that `tokenizers` cannot take (a TypeError, then a 500 on every text
    endpoint, found by benchmarks/soak.py): a TokenizerError (400) naming it; a surrogate pair is a character."""
    ours, _, _ = _pair(tokenizer_dirs, "tiny-llama")
    with pytest.raises(TokenizerError, match=r"lone UTF-16 surrogate U\+D800 at character 2"):
        ours.encode("a " + "\ud800" + " b")
    with pytest.raises(TokenizerError, match=r"U\+DFFF at character 0"):
        ours.encode("\udfff")
    assert ours.encode("😀 é") == ours.encode(json.loads('"\\ud83d\\ude00 \\u00e9"'))
