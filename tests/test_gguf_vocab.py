"""Tokenizers built from GGUF metadata reproduce llama.cpp's token ids on its test vectors."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from ember.errors import TokenizerError
from ember.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata
from tests.conftest import SHARED

TESTDATA = SHARED
VOCAB_DIR = TESTDATA / "vocab"
VOCABS = ["llama-spm", "llama-bpe", "phi-3", "gpt-2", "bert-bge", "deepseek-coder", "falcon", "qwen2", "starcoder"]
CASE_SEPARATOR = "\n__ggml_vocab_test__\n"

pytestmark = pytest.mark.skipif(not VOCAB_DIR.is_dir(), reason="shared test data not present")


def read_metadata(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


@functools.cache
def vocab_metadata(name: str) -> dict:
    return read_metadata(VOCAB_DIR / f"ggml-vocab-{name}.gguf")


@functools.cache
def vocab_tokenizer(name: str):
    return tokenizer_from_gguf_metadata(vocab_metadata(name))


def load_vectors(name: str) -> list[tuple[str, list[int]]]:
    """The (text, ids) pairs of a vocabulary's `.inp`/`.out` files.

    Every text in `.inp` is followed by the separator line (the file ends with one), and `.out` has
    one line of ids per text, each line ending in a newline.
    """
    inputs = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    texts = inputs.split(CASE_SEPARATOR)
    assert texts[-1] == ""
    lines = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    ids = [[int(token_id) for token_id in line.split()] for line in lines[:-1]]
    assert len(texts[:-1]) == len(ids)
    return list(zip(texts[:-1], ids, strict=True))




@contextmanager
def special_tokens_as_text(tokenizer):
    """llama.cpp's `parse_special=false`: control-token text is tokenized like any other text."""
    tokenizer.hf.encode_special_tokens = True
    try:
        yield
    finally:
        tokenizer.hf.encode_special_tokens = False


def llama_cpp_ids(tokenizer, text: str) -> list[int]:
    """Ids as llama.cpp's tokenizer tests produce them: no BOS/EOS, special-token text as plain text."""
    with special_tokens_as_text(tokenizer):
        return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", VOCABS)
def test_matches_llama_cpp_vectors(name):
    tokenizer = vocab_tokenizer(name)
    vectors = load_vectors(name)
    mismatches = [(text, want, llama_cpp_ids(tokenizer, text)) for text, want in vectors
                  if llama_cpp_ids(tokenizer, text) != want]
    assert not mismatches, f"{len(mismatches)}/{len(vectors)} differ; first: {mismatches[0]}"


# Byte-level BPE and SentencePiece with byte fallback lose nothing; WordPiece lowercases.
LOSSLESS = [name for name in VOCABS if name != "bert-bge"]


@pytest.mark.parametrize("name", LOSSLESS)
def test_decode_inverts_encode(name):
    tokenizer = vocab_tokenizer(name)
    texts = [text for text, _ in load_vectors(name)] + ["  two leading spaces", "tab\tnew\nline\r\n", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦙"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize(
    ("name", "bos", "eos", "add_bos", "add_eos", "pad_id"),
    [
        ("llama-spm", "<s>", "</s>", True, False, None),
        ("phi-3", "<s>", "<|endoftext|>", True, False, 32000),
        ("llama-bpe", "<|begin_of_text|>", "<|end_of_text|>", True, False, None),
        ("gpt-2", "<|endoftext|>", "<|endoftext|>", False, False, None),
        ("deepseek-coder", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", True, False, 32014),
        ("falcon", "<|endoftext|>", "<|endoftext|>", False, False, None),
        ("qwen2", "<|endoftext|>", "<|endoftext|>", False, False, 151643),
        ("starcoder", "<|endoftext|>", "<|endoftext|>", False, False, None),
        ("bert-bge", "[CLS]", "[SEP]", True, True, 0),
    ],
)
def test_special_tokens_and_flags(name, bos, eos, add_bos, add_eos, pad_id):
    tokenizer = vocab_tokenizer(name)
    assert (tokenizer.bos_token, tokenizer.eos_token) == (bos, eos)
    assert (tokenizer.add_bos, tokenizer.add_eos) == (add_bos, add_eos)
    assert tokenizer.pad_token_id == pad_id
    assert tokenizer.hf.token_to_id(eos) in tokenizer.eos_token_ids


def test_end_of_turn_tokens_stop_generation():
    # Chat models end a turn with a token other than EOS; llama.cpp stops on those too.
    assert vocab_tokenizer("llama-bpe").eos_token_ids == {128001, 128009}  # <|end_of_text|>, <|eot_id|>
    assert vocab_tokenizer("phi-3").eos_token_ids == {32000, 32007}  # <|endoftext|>, <|end|>
    assert vocab_tokenizer("qwen2").eos_token_ids == {151643, 151645}  # <|endoftext|>, <|im_end|>


def test_bos_and_eos_added_as_flagged():
    spm = vocab_tokenizer("llama-spm")
    assert spm.encode("Hello world") == [1, 15043, 3186]
    assert spm.encode("Hello world", add_special_tokens=False) == [15043, 3186]
    assert vocab_tokenizer("gpt-2").encode("Hello world") == [15496, 995]
    assert vocab_tokenizer("bert-bge").encode("Hello world") == [101, 7592, 2088, 102]


def test_absent_flags_take_llama_cpp_defaults():
    def flags(name: str, **overrides) -> tuple[bool, bool]:
        metadata = {key: value for key, value in vocab_metadata(name).items()
                    if key not in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token")}
        tokenizer = tokenizer_from_gguf_metadata({**metadata, **overrides})
        return tokenizer.add_bos, tokenizer.add_eos

    assert flags("llama-spm") == (True, False)  # SentencePiece always starts with BOS
    assert flags("deepseek-coder") == (False, False)  # byte-level BPE only when flagged ...
    assert flags("llama-bpe") == (True, False)  # ... or for the Llama 3 family
    assert flags("gpt-2", **{"tokenizer.ggml.add_bos_token": True}) == (True, False)
    assert flags("llama-spm", **{"tokenizer.ggml.add_eos_token": True}) == (True, True)


def test_special_token_text_is_parsed_unless_asked_not_to():
    qwen = vocab_tokenizer("qwen2")
    text = "<|im_start|>user\nhi<|im_end|>"
    assert qwen.encode(text, add_special_tokens=False) == [151644, 872, 198, 6023, 151645]
    assert 151644 not in llama_cpp_ids(qwen, text)
    assert qwen.decode([151644, 872, 198, 6023, 151645], skip_special_tokens=True) == "user\nhi"


def test_user_defined_tokens_are_always_split_out():
    # phi-3 marks "</s>" user-defined: llama.cpp splits it out even when not parsing special tokens.
    phi3 = vocab_tokenizer("phi-3")
    assert llama_cpp_ids(phi3, "a</s>b") == [263, 2, 289]


def test_sentencepiece_prefixes_a_space_after_special_tokens():
    # llama.cpp starts every stretch of text after a special token with "▁", as at the start.
    spm = vocab_tokenizer("llama-spm")
    assert spm.encode("Hello</s>Hello", add_special_tokens=False) == [15043, 2, 15043]


def test_sentencepiece_matches_transformers_tokenizer_json():
    # The same llama-spm vocabulary as saved by transformers. Its Metaspace pre-tokenizer does not add
    # "▁" before text that starts with a space, where llama.cpp (and ember) does: the strings avoid that.
    reference = HFTokenizer.from_file(str(TESTDATA / "gguf" / "tiny-llama-hf" / "tokenizer.json"))
    spm = vocab_tokenizer("llama-spm")
    for text in ["Hello world", "naïve café 日本語 🦙 tabs\tand\nnewlines", "I'm 1234 años, isn't it?",
                 "def f(x):\n    return x**2  # squared", "<0x0A> is not a byte token here"]:
        assert spm.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False).ids


def test_chat_template_is_passed_through():
    assert vocab_tokenizer("phi-3").chat_template == vocab_metadata("phi-3")["tokenizer.chat_template"]
    assert vocab_tokenizer("llama-spm").chat_template is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tokenizer.ggml.model": "rwkv"}, "unsupported GGUF tokenizer model"),
        ({"tokenizer.ggml.pre": "no-such-pre"}, "unsupported GGUF pre-tokenizer"),
        ({"tokenizer.ggml.tokens": []}, "has no tokenizer"),
        ({"tokenizer.ggml.merges": []}, "no tokenizer.ggml.merges"),
    ],
)
def test_unsupported_metadata_raises_tokenizer_error(overrides, message):
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_gguf_metadata({**vocab_metadata("gpt-2"), **overrides})


def test_sentencepiece_needs_scores():
    metadata = {key: value for key, value in vocab_metadata("llama-spm").items() if key != "tokenizer.ggml.scores"}
    with pytest.raises(TokenizerError, match="scores"):
        tokenizer_from_gguf_metadata(metadata)
