"""Inputs of an encoder as sentence-transformers tokenizes them: `[CLS] text [SEP]` (`<s> text </s>` for
RoBERTa), pairs as `[CLS] a [SEP] b [SEP]` with token types 0/1, each cut to max_seq_length tokens (specials
included) by `tokenizers`' longest-first truncation, the one transformers applies for sentence-transformers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from tokenizers.models import Unigram

from ember.errors import TokenizerError
from ember.tokenizer.tokenizer import Tokenizer


@dataclass
class EncoderInput:
    ids: list[int]
    type_ids: list[int]


class EncoderTokenizer:
    def __init__(self, hf: HFTokenizer, max_length: int, lowercase: bool = False,
                 normalize: Callable[[str], str] | None = None):
        self.hf = hf
        self.max_length = max_length
        self.lowercase = lowercase
        self.normalize = normalize  # the GGUF Tokenizer's own, applied before `tokenizers`
        hf.no_padding()  # tokenizer.json files often carry a fixed padding of their own
        hf.enable_truncation(max_length, strategy="longest_first")

    @classmethod
    def from_dir(cls, directory: Path, max_length: int, lowercase: bool = False) -> EncoderTokenizer:
        """tokenizer.json with its own post-processor (BERT's or RoBERTa's template)."""
        try:
            hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as err:  # tokenizers raises plain Exceptions for missing or malformed files
            raise TokenizerError(f"{directory}: no usable tokenizer.json ({str(err).splitlines()[0][:200]})") from None
        if hf.post_processor is None:
            raise TokenizerError(f"{directory}/tokenizer.json has no post-processor to add [CLS]/[SEP]")
        return cls(hf, max_length, lowercase)

    @classmethod
    def from_gguf_tokenizer(cls, tokenizer: Tokenizer, max_length: int) -> EncoderTokenizer:
        """A GGUF vocabulary's CLS and SEP tokens (the Tokenizer's BOS and EOS) around each text: BERT's pairs
        `[CLS] a [SEP] b [SEP]` (types 0/1) for WordPiece, XLM-R's `<s> a </s></s> b </s>` (one type, as
        llama.cpp's reranking prompt) for a unigram vocabulary (multilingual-e5, bge-m3, bge-reranker-v2-m3)."""
        if tokenizer.bos_token is None or tokenizer.eos_token is None:
            raise TokenizerError("the GGUF vocabulary names no CLS/SEP tokens")
        hf = HFTokenizer.from_str(tokenizer.hf.to_str())
        cls_token, sep_token = tokenizer.bos_token, tokenizer.eos_token
        pair = (f"{cls_token} $A {sep_token} {sep_token} $B {sep_token}" if isinstance(hf.model, Unigram)
                else f"{cls_token} $A {sep_token} $B:1 {sep_token}:1")
        hf.post_processor = processors.TemplateProcessing(
            single=f"{cls_token} $A {sep_token}", pair=pair,
            special_tokens=[(cls_token, tokenizer.bos_token_id), (sep_token, tokenizer.eos_token_id)])
        return cls(hf, max_length, normalize=tokenizer.normalize)

    def _text(self, text: str) -> str:
        text = text.strip()  # as sentence-transformers does
        if self.normalize is not None:
            text = self.normalize(text)
        return text.lower() if self.lowercase else text

    def encode(self, texts: list[str]) -> list[EncoderInput]:
        encodings = self.hf.encode_batch([self._text(t) for t in texts])
        return [EncoderInput(e.ids, e.type_ids) for e in encodings]

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[EncoderInput]:
        encodings = self.hf.encode_batch([(self._text(a), self._text(b)) for a, b in pairs])
        return [EncoderInput(e.ids, e.type_ids) for e in encodings]
