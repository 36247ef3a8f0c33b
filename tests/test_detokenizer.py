"""Streaming detokenization: the deltas of IncrementalDetokenizer add up to the full decode, never emitting
half a character, and keep SentencePiece's spaces."""

from __future__ import annotations

import functools
import random

import pytest

import ember
from ember.tokenizer.detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer
from tests.conftest import SHARED

TESTDATA = SHARED
TINY_LLAMA = TESTDATA / "gguf" / "tiny-llama-hf"
VOCAB_DIR = TESTDATA / "vocab"
GGUF_VOCABS = ["llama-spm", "qwen2", "llama-bpe", "phi-3", "bert-bge"]
CASE_SEPARATOR = "\n__ggml_vocab_test__\n"

TEXTS = [
    "Hello world",
    " Hello  world, with two spaces",
    "   leading spaces and trailing   ",
    "line one\nline two\n\n  indented\ttab",
    "日本語のテキストです。中文也可以：鬱",
    "emoji 🙂🚀 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "Crème brûlée à la carte, naïve façade, Ångström",
    "math 𝔘𐍈 ∑ x² ≤ ∞",
    "Ελληνικά и кириллица и עברית",
    "don't stop: it's (really) \"quoted\" — ok?",
    "def f(x):\n    return x * 2  # comment\n",
    "🙂",
    "a",
]

pytestmark = pytest.mark.skipif(not TESTDATA.is_dir(), reason="shared test data not present")


@functools.cache
def tokenizer(name: str):
    if name == "tiny-llama-hf":
        return ember.load_tokenizer(TINY_LLAMA)
    return ember.load_tokenizer(VOCAB_DIR / f"ggml-vocab-{name}.gguf")


def vocab_texts(name: str) -> list[str]:
    texts = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(CASE_SEPARATOR)
    assert texts[-1] == ""
    return texts[:-1]


def stream(tok, ids, prompt=(), skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_token_ids=prompt, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(token_id) for token_id in ids]
    assert detok.text == "".join(deltas)
    return deltas


def expected(tok, ids, prompt=(), skip_special_tokens=True) -> str:
    """What the generated ids add to the decoded prompt (the whole decode when there is no prompt)."""
    context = list(prompt)[-CONTEXT_TOKENS:]
    before = tok.decode(context, skip_special_tokens=skip_special_tokens)
    full = tok.decode(context + list(ids), skip_special_tokens=skip_special_tokens)
    assert full.startswith(before)
    return full[len(before):]


def assert_streams_like_decode(tok, ids, prompt=(), skip_special_tokens=True):
    deltas = stream(tok, ids, prompt, skip_special_tokens)
    want = expected(tok, ids, prompt, skip_special_tokens)
    assert "".join(deltas) == want
    if "\ufffd" not in want:
        assert not any("\ufffd" in delta for delta in deltas), deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_tiny_llama_streams_like_decode(text, skip_special_tokens):
    tok = tokenizer("tiny-llama-hf")
    ids = tok.encode(text, add_special_tokens=False)
    assert_streams_like_decode(tok, ids, skip_special_tokens=skip_special_tokens)
    assert "".join(stream(tok, ids, skip_special_tokens=skip_special_tokens)) == tok.decode(ids)
    # with BOS/EOS around the text: skipped, or shown as their text
    wrapped = [tok.bos_token_id, *ids, tok.eos_token_id]
    got = "".join(stream(tok, wrapped, skip_special_tokens=skip_special_tokens))
    assert got == tok.decode(wrapped, skip_special_tokens=skip_special_tokens)
    assert ("<s>" in got) == (not skip_special_tokens)


def test_sentencepiece_spaces_are_kept():
    tok = tokenizer("tiny-llama-hf")
    prompt = tok.encode("The answer is")
    ids = tok.encode(" forty two,  exactly.", add_special_tokens=False)
    assert tok.id_to_piece(ids[0]).startswith("\u2581")
    deltas = stream(tok, ids, prompt)
    assert "".join(deltas) == " forty two,  exactly."
    assert deltas[0].startswith(" ")
    # Without a prompt the first word's space is dropped, as in decode().
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "forty two,  exactly."


def test_multi_byte_characters_arrive_whole():
    tok = tokenizer("tiny-llama-hf")
    ids = tok.encode("x🙂y鬱", add_special_tokens=False)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert "<0xF0>" in pieces  # the emoji is spelled in byte-fallback tokens
    deltas = stream(tok, ids)
    assert [d for d in deltas if d] == ["x", "🙂", "y", "鬱"]
    # A character cut off at the end of the stream is held back, never emitted as U+FFFD.
    assert "".join(stream(tok, tok.encode("ab🙂", add_special_tokens=False)[:-2])) == "ab"


@pytest.mark.parametrize("name", ["tiny-llama-hf", "qwen2"])
def test_prompt_ending_inside_a_character(name):
    """Token-id prompts can end inside a character; the generated tokens that complete it must not be lost."""
    if name != "tiny-llama-hf" and not (VOCAB_DIR / f"ggml-vocab-{name}.gguf").is_file():
        pytest.skip(f"vocabulary {name} not present")
    tok = tokenizer(name)
    tested = 0
    # (Not covered: a prompt window that starts inside a run of byte-fallback tokens, e.g. "𝔘𐍈" cut after
    # 𝔘 and two bytes, which SentencePiece's decoder turns into U+FFFD as a whole.)
    for text in ("Say x🙂y!", "Say 鬱y!", "Say ꙮ y!", "Say 🦩 y!"):
        ids = tok.encode(text, add_special_tokens=False)
        splits = [i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd")]
        if not splits:
            continue  # every character of this text is a single token here
        prompt, generated = ids[:splits[-1]], ids[splits[-1]:]
        deltas = stream(tok, generated, prompt)
        assert "".join(deltas).endswith("y!"), deltas
        assert "".join(deltas) == tok.decode(ids)[len(tok.decode(prompt).rstrip("\ufffd")):]
        assert not any("\ufffd" in d for d in deltas)
        tested += 1
    assert tested >= 2


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_mid_stream(skip_special_tokens):
    tok = tokenizer("tiny-llama-hf")
    hello, world = (tok.encode(t, add_special_tokens=False) for t in ("Hello there", " world 🙂"))
    ids = [*hello, tok.eos_token_id, tok.bos_token_id, *world, tok.eos_token_id]
    for prompt in ((), tok.encode("Say hi:")):
        assert_streams_like_decode(tok, ids, prompt, skip_special_tokens)


@pytest.mark.parametrize("prompt_text", ["", "Q:", "日本", "a\n", "The quick brown fox jumps over the lazy dog"])
def test_after_a_prompt(prompt_text):
    tok = tokenizer("tiny-llama-hf")
    prompt = tok.encode(prompt_text)
    for text in TEXTS:
        assert_streams_like_decode(tok, tok.encode(text, add_special_tokens=False), prompt)


@pytest.mark.parametrize("name", GGUF_VOCABS)
def test_gguf_vocab_streams_like_decode(name):
    if not (VOCAB_DIR / f"ggml-vocab-{name}.gguf").is_file():
        pytest.skip(f"vocabulary {name} not present")
    tok = tokenizer(name)
    for text in vocab_texts(name) + TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for skip_special_tokens in (True, False):
            assert_streams_like_decode(tok, ids, skip_special_tokens=skip_special_tokens)
        assert_streams_like_decode(tok, ids, prompt=tok.encode("Answer:"))


@pytest.mark.parametrize("name", ["tiny-llama-hf", *GGUF_VOCABS])
def test_random_mixtures(name):
    """Streams of real words, special tokens and prompts in random combinations."""
    if name != "tiny-llama-hf" and not (VOCAB_DIR / f"ggml-vocab-{name}.gguf").is_file():
        pytest.skip(f"vocabulary {name} not present")
    tok = tokenizer(name)
    rng = random.Random(1234)
    words = [w for text in TEXTS for w in text.split(" ")] + [" ", "\n", "🙂", "é", "鬱"]
    specials = sorted(tok.special_ids)[:20]
    for _ in range(40):
        ids: list[int] = []
        for _ in range(rng.randint(1, 8)):
            if specials and rng.random() < 0.2:
                ids.append(rng.choice(specials))
            else:
                ids += tok.encode(rng.choice(["", " "]) + rng.choice(words), add_special_tokens=False)
        prompt = tok.encode(rng.choice(words)) if rng.random() < 0.5 else []
        assert_streams_like_decode(tok, ids, prompt, skip_special_tokens=rng.random() < 0.5)
