"""Every `tokenizer.ggml.pre` llama.cpp knows either cuts text exactly as llama.cpp does or is refused by name.

Expected ids come from llama.cpp itself (scripts/pretokenizer_vectors.py, tests/data/llama_cpp_pretokenizers.json):
a synthetic vocabulary in which every short piece of the test texts is one token, so that the ids show
where each pre-tokenizer cut the text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Regex

from ember.errors import TokenizerError
from ember.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata
from ember.tokenizer.pre_tokenizers import PRE_TOKENIZERS, PreTokenizer, Refused
from tests.pretokenizer_vocab import synthetic_metadata, write_synthetic_gguf
from tests.test_cli import ember
from tests.test_gguf_vocab import VOCAB_DIR, llama_cpp_ids, vocab_metadata

DATA = json.loads((Path(__file__).parent / "data" / "llama_cpp_pretokenizers.json").read_text(encoding="utf-8"))
TEXTS = DATA["texts"]
SUPPORTED = sorted(name for name, entry in PRE_TOKENIZERS.items() if isinstance(entry, PreTokenizer))
REFUSED = sorted(name for name, entry in PRE_TOKENIZERS.items() if isinstance(entry, Refused))

_synthetic = synthetic_metadata(TEXTS, "default")
_tokenizers: dict[PreTokenizer, object] = {}


def synthetic_tokenizer(name: str):
    """ember's tokenizer for the synthetic vocabulary with `tokenizer.ggml.pre` = name (one per distinct entry)."""
    entry = PRE_TOKENIZERS[name]
    if entry not in _tokenizers:
        _tokenizers[entry] = tokenizer_from_gguf_metadata({**_synthetic, "tokenizer.ggml.pre": name})
    return _tokenizers[entry]


def test_table_holds_every_name_llama_cpp_knows():
    assert sorted(PRE_TOKENIZERS) == sorted(DATA["by_pre"])
    assert DATA["no-such-pre"] == "refused"  # as ember refuses names outside the table


@pytest.mark.parametrize("name", SUPPORTED)
def test_regexes_compile_in_oniguruma(name):
    for pattern in PRE_TOKENIZERS[name].splits:
        Regex(pattern)  # raises on a pattern Oniguruma rejects


@pytest.mark.parametrize("name", SUPPORTED)
def test_splits_match_llama_cpp(name):
    tokenizer = synthetic_tokenizer(name)
    expected = DATA["results"][DATA["by_pre"][name]]
    for text, line in zip(TEXTS, expected, strict=True):
        want = [int(token_id) for token_id in line.split()]
        got = tokenizer.encode(text, add_special_tokens=False)
        pieces = [_synthetic["tokenizer.ggml.tokens"][token_id] for token_id in got]
        wanted = [_synthetic["tokenizer.ggml.tokens"][token_id] for token_id in want]
        assert got == want, f"{name}: {text!r} cut as {pieces}, llama.cpp: {wanted}"


@pytest.mark.skipif(not VOCAB_DIR.is_dir(), reason="shared test data not present")
def test_deepseek_llm_tokenizes_like_llama_cpp():
    # DeepSeek LLM's pre-tokenizer failed to compile ("empty range in char class") before its code points
    # were escaped. Here over a real vocabulary (DeepSeek Coder's, the same BPE family) as llama.cpp runs it.
    tokenizer = tokenizer_from_gguf_metadata({**vocab_metadata("deepseek-coder"), "tokenizer.ggml.pre": "deepseek-llm"})
    expected = DATA["deepseek_llm_on_deepseek_coder_vocab"]
    for text, line in zip(TEXTS, expected, strict=True):
        assert llama_cpp_ids(tokenizer, text) == [int(token_id) for token_id in line.split()], text
    assert tokenizer.decode(llama_cpp_ids(tokenizer, "Ελληνικά ΐ Ω 中文 한국어")) == "Ελληνικά ΐ Ω 中文 한국어"


@pytest.mark.parametrize("name", [*REFUSED, "no-such-pre"])
def test_refused_pre_tokenizer_is_named_in_a_one_line_error(name):
    with pytest.raises(TokenizerError) as raised:
        tokenizer_from_gguf_metadata({**_synthetic, "tokenizer.ggml.pre": name})
    message = str(raised.value)
    assert f"tokenizer.ggml.pre={name!r}" in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "add_bos", "bos_id"),
    [("llama3", True, 11), ("tekken", True, 11), ("chameleon", True, 11), ("qwen2", False, 11),
     ("chatglm-bpe", False, None), ("glm4", False, None)],
)
def test_flags_follow_llama_cpp_when_the_file_is_silent(name, add_bos, bos_id):
    tokenizer = synthetic_tokenizer(name)
    assert tokenizer.add_bos == add_bos
    assert tokenizer.bos_token == (None if bos_id is None else _synthetic["tokenizer.ggml.tokens"][bos_id])


def test_cli_loads_deepseek_llm_and_refuses_gemma4_in_one_line(tmp_path):
    deepseek_llm, gemma4 = tmp_path / "deepseek-llm.gguf", tmp_path / "gemma4.gguf"
    write_synthetic_gguf(deepseek_llm, TEXTS, "deepseek-llm")
    write_synthetic_gguf(gemma4, TEXTS, "gemma4")
    result = ember("tokenize", str(deepseek_llm), TEXTS[0], "--ids")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [int(token_id) for token_id in DATA["results"][DATA["by_pre"]["deepseek-llm"]][0].split()]
    result = ember("tokenize", str(gemma4), TEXTS[0])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "tokenizer.ggml.pre='gemma4'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
