"""GGUF 't5' (SentencePiece unigram) vocabularies reproduce llama.cpp's token ids, and an XLM-R-shaped encoder
GGUF with one embeds through ember's embedding path.

tests/data/xlmr-unigram-vocab.gguf is XLM-R's vocabulary (llama.cpp's ggml-vocab-nomic-bert-moe.gguf: the one
of multilingual-e5, bge-m3, bge-reranker-v2-m3) cut down to the pieces of the test texts, with its full
precompiled charsmap; tests/data/llama_cpp_unigram.json holds llama.cpp's ids on that exact file
(scripts/unigram_vectors.py regenerates both)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ember.errors import TokenizerError
from ember.llm import LLM
from ember.tokenizer.charsmap import CharsMap
from ember.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata
from ember.tokenizer.tokenizer import load_tokenizer
from tests.test_gguf_vocab import llama_cpp_ids, read_metadata
from tests.tiny_encoders import build_tiny_bert, write_gguf

DATA = Path(__file__).parent / "data"
VOCAB = DATA / "xlmr-unigram-vocab.gguf"
VECTORS = json.loads((DATA / "llama_cpp_unigram.json").read_text(encoding="utf-8"))
CASES = list(zip(VECTORS["texts"], VECTORS["plain"], VECTORS["special"], strict=True))
CONTROL_TEXTS = ("<s>", "</s>", "<mask>", "<unk>", "<pad>")


def _ids(line: str) -> list[int]:
    return [int(token_id) for token_id in line.split()]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(VOCAB)


@pytest.mark.parametrize(("text", "plain", "special"), CASES, ids=[repr(text)[:40] for text, _, _ in CASES])
def test_ids_match_llama_cpp(tokenizer, text, plain, special):
    # As llama.cpp's server tokenizes: <s> ... </s>, special-token text parsed as those tokens.
    assert tokenizer.encode(text) == _ids(special)
    if any(control in text for control in CONTROL_TEXTS):
        # Known difference: with special tokens parsed as text (a mode ember never uses), `tokenizers`' unigram
        # may match a control token's own piece ("<s>"), which llama.cpp leaves out of its piece trie.
        return
    # As llama.cpp's tokenizer tests do: no <s>/</s>, special-token text as plain text.
    assert llama_cpp_ids(tokenizer, text) == _ids(plain)


def test_vocabulary_reads_as_xlm_r(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.add_bos, tokenizer.add_eos) == ("<s>", "</s>", True,
                                                                                                 True)
    assert tokenizer.pad_token_id == 1
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
    assert tokenizer.decode(tokenizer.encode("  a  b  ")) == "a b"  # extra whitespace removed, as llama.cpp does


@functools.cache
def _metadata() -> dict:
    return read_metadata(VOCAB)


def _charsmap() -> bytes:
    return bytes(_metadata()["tokenizer.ggml.precompiled_charsmap"])


def _trie_size() -> int:
    return int.from_bytes(_charsmap()[:4], "little")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda table: table[:2], "too short"),
    (lambda table: (1 << 30).to_bytes(4, "little") + table[4:], "trie size 1073741824 does not fit"),
    (lambda table: table[:4 + _trie_size()], "trie size .* does not fit"),  # no replacement strings
    (lambda table: table[:-1] + b"a", "has no end"),  # the last replacement string unterminated
    (lambda table: table[:4 + _trie_size() + 10], "outside the table"),  # most replacements cut off
    (lambda table: table[:4] + b"\xff\xff\xff\x7f" + table[8:], "outside the array"),  # the root's BASE
    (lambda table: list(table[:8]) + ["a"], "array of bytes"),
    (lambda table: "abc", "array of bytes"),
])
def test_malformed_charsmap_is_refused(mutate, message):
    metadata = {**_metadata(), "tokenizer.ggml.precompiled_charsmap": mutate(_charsmap())}
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_gguf_metadata(metadata)


def test_charsmap_as_int8_array_and_fast_path_equal_the_scan():
    """llama.cpp accepts the table as int8 too; texts without combining marks skip the key-by-key scan, which
    must give the same result on them."""
    signed = [byte - 256 if byte > 127 else byte for byte in _charsmap()]
    tokenizer = tokenizer_from_gguf_metadata({**_metadata(), "tokenizer.ggml.precompiled_charsmap": signed})
    charsmap = CharsMap(_charsmap())
    for text, _, special in CASES:
        assert tokenizer.encode(text) == _ids(special)
        if not charsmap._needs_scan.search(text):
            assert charsmap.normalize(text) == charsmap._scan(text.encode()).decode()


def test_missing_scores_and_unknown_token_are_refused():
    metadata = _metadata()
    with pytest.raises(TokenizerError, match="scores"):
        tokenizer_from_gguf_metadata({**metadata, "tokenizer.ggml.scores": [0.0]})
    tokens = metadata["tokenizer.ggml.tokens"]
    with pytest.raises(TokenizerError, match="unknown token"):
        tokenizer_from_gguf_metadata({**metadata, "tokenizer.ggml.tokens": tokens[:2],
                                      "tokenizer.ggml.unknown_token_id": 99})


def test_xlm_r_shaped_encoder_gguf_embeds(tmp_path):
    """A tiny random RoBERTa (XLM-R's architecture) written as GGUF with the unigram vocabulary: ember embeds with
    llama.cpp's ids, and its vectors equal transformers' model on those ids (positions after pad+1, as the GGUF's
    trimmed position table has them; mean pooling; normalized)."""
    import transformers

    directory = build_tiny_bert(tmp_path / "roberta", "roberta")
    llm = LLM(str(write_gguf(directory, tmp_path / "xlmr.gguf", vocab=VOCAB)))
    texts = ["query: how much protein should a female eat", "naïve café Ångström façade résumé Straße",
             "中文测试：你好，世界！这是一个句子。"]
    special_ids = {text: _ids(special) for text, _, special in CASES}
    want_ids = [special_ids[text] for text in texts]
    encoded = llm.engine.loaded.encoder_tokenizer.encode(texts)
    assert [e.ids for e in encoded] == want_ids
    model = transformers.RobertaModel.from_pretrained(directory, add_pooling_layer=False).eval()
    with torch.no_grad():
        reference = torch.stack([
            model(input_ids=torch.tensor([ids]), position_ids=torch.arange(1, len(ids) + 1)[None]).last_hidden_state[0]
            .mean(0) for ids in want_ids])
    ours = torch.tensor(llm.embed(texts))
    assert (ours - F.normalize(reference, dim=-1)).abs().max() < 1e-4
    # Query/document pairs as XLM-R rerankers (bge-reranker-v2-m3) and llama.cpp's rerank prompt join them.
    pair = llm.engine.loaded.encoder_tokenizer.encode_pairs([(texts[0], texts[1])])[0]
    eos = llm.tokenizer.eos_token_id
    assert pair.ids == [*want_ids[0], eos, *want_ids[1][1:]] and set(pair.type_ids) == {0}
