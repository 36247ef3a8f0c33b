"""Build ember's Tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.

The vocabulary is turned into a Hugging Face `tokenizers.Tokenizer` (so encoding runs in Rust) that
splits text the way llama.cpp does for the same file:

- `llama`: SentencePiece BPE. Pieces merge by the score of the piece they form, spaces are `▁`, a
  `▁` is prepended to every stretch of text (at the start and after each special token), and
  characters outside the vocabulary fall back to `<0xXX>` byte tokens.
- `gpt2`: byte-level BPE from `merges`, after the pre-tokenizer split named by `tokenizer.ggml.pre`
  (the regexes of `ember.tokenizer.pre_tokenizers`).
- `bert`: WordPiece over lowercased, accent-stripped words; GGUF marks word-initial pieces with `▁`
  where BERT marks continuations with `##`.
- `t5`: SentencePiece unigram (T5, XLM-R: multilingual-e5, bge-m3, bge-reranker-v2-m3, nomic-embed-text-v2):
  the text is normalized by SentencePiece's precompiled charsmap (`tokenizer.ggml.precompiled_charsmap`,
  NFKC plus its own mappings; ember.tokenizer.charsmap, run before `tokenizers`), its spaces become `▁` (runs merged and the ends trimmed when
  `remove_extra_whitespaces` is set), and the highest-scoring segmentation into pieces is taken.

Control and unknown tokens become special added tokens, user-defined tokens plain added tokens: as
in llama.cpp, user-defined tokens are always split out of the text, special ones only when special
tokens are parsed (`tokenizers`' `encode_special_tokens=False`, its default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE, Unigram, WordPiece

from ember.errors import TokenizerError
from ember.tokenizer.charsmap import CharsMap
from ember.tokenizer.pre_tokenizers import pre_tokenizer
from ember.tokenizer.tokenizer import Tokenizer

SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space


class TokenType(IntEnum):
    """Values of `tokenizer.ggml.token_type`."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Texts of tokens that end a turn although the file does not name them EOS (llama.cpp's list).
_END_OF_TURN_TEXTS = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
    "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>",
}

_PREFIX = "tokenizer.ggml."


def tokenizer_from_gguf_metadata(metadata: dict) -> Tokenizer:
    """A Tokenizer for a GGUF file's metadata (strings as str, arrays as lists)."""
    model = metadata.get(_PREFIX + "model")
    tokens = metadata.get(_PREFIX + "tokens")
    if model is None or not tokens:
        raise TokenizerError("the GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    if not all(isinstance(text, str) for text in tokens):
        raise TokenizerError("tokenizer.ggml.tokens must be a list of strings")
    # llama.cpp refuses empty token texts too; it renames them so every id keeps a text.
    tokens = [text or f"[EMPTY_{i}]" for i, text in enumerate(tokens)]
    types = _token_types(metadata, len(tokens))
    normalize = None

    if model == "llama":
        hf, specials = _sentencepiece_bpe(metadata, tokens)
    elif model == "gpt2":
        hf, specials = _byte_level_bpe(metadata, tokens)
    elif model == "bert":
        hf, specials = _wordpiece(metadata, tokens, types)
    elif model == "t5":
        hf, specials = _unigram(metadata, tokens, types)
        normalize = _charsmap_normalizer(metadata)
    else:
        raise TokenizerError(f"unsupported GGUF tokenizer model {model!r} (supported: llama, gpt2, bert, t5)")
    _add_special_tokens(hf, tokens, types)
    if specials.add_bos and specials.bos_id is None:
        raise TokenizerError("the GGUF tokenizer asks for a BOS token but names none")
    if specials.add_eos and specials.eos_id is None:
        raise TokenizerError("the GGUF tokenizer asks for an EOS token but names none")
    template = metadata.get("tokenizer.chat_template")
    return Tokenizer(
        hf,
        bos_token=tokens[specials.bos_id] if specials.bos_id is not None else None,
        eos_token=tokens[specials.eos_id] if specials.eos_id is not None else None,
        eos_token_ids=_end_of_generation_ids(metadata, tokens, specials.eos_id),
        add_bos=specials.add_bos,
        add_eos=specials.add_eos,
        chat_template=template if isinstance(template, str) else None,
        pad_token_id=specials.pad_id,
        fim_token_ids=_fim_ids(metadata, len(tokens)),
        normalize=normalize,
    )


def _fim_ids(metadata: dict, n_tokens: int) -> tuple[int, int, int] | None:
    """The fill-in-the-middle prefix/suffix/middle ids the file names (newer keys first, CodeLlama's older ones)."""
    for keys in (("fim_pre_token_id", "fim_suf_token_id", "fim_mid_token_id"),
                 ("prefix_token_id", "suffix_token_id", "middle_token_id")):
        ids = [_token_id(metadata, key, n_tokens, None) for key in keys]
        if None not in ids:
            return ids[0], ids[1], ids[2]
    return None


@dataclass
class _SpecialTokens:
    """Ids of the tokens a tokenizer adds or pads with, and whether it adds them."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool


def _special_tokens(metadata: dict, n_tokens: int, *, bos_id: int | None, eos_id: int | None,
                    add_bos: bool, add_eos: bool = False, pad_id: int | None = None) -> _SpecialTokens:
    """The file's special tokens and flags, falling back on llama.cpp's defaults for the model given."""
    return _SpecialTokens(
        bos_id=_token_id(metadata, "bos_token_id", n_tokens, bos_id),
        eos_id=_token_id(metadata, "eos_token_id", n_tokens, eos_id),
        pad_id=_token_id(metadata, "padding_token_id", n_tokens, pad_id),
        add_bos=bool(metadata.get(_PREFIX + "add_bos_token", add_bos)),
        add_eos=bool(metadata.get(_PREFIX + "add_eos_token", add_eos)),
    )


def _sentencepiece_bpe(metadata: dict, tokens: list[str]) -> tuple[HFTokenizer, _SpecialTokens]:
    scores = metadata.get(_PREFIX + "scores")
    if scores is None or len(scores) < len(tokens):
        raise TokenizerError("the GGUF 'llama' tokenizer needs one tokenizer.ggml.scores entry per token")
    vocab = _vocab(tokens)
    unk_id = _token_id(metadata, "unknown_token_id", len(tokens), 0)
    unk_token = tokens[unk_id] if unk_id is not None else None
    hf = HFTokenizer(BPE(vocab, _merges_by_score(tokens, scores, vocab), unk_token=unk_token, fuse_unk=True,
                         byte_fallback=True))

    add_space_prefix = bool(metadata.get(_PREFIX + "add_space_prefix", True))
    # A normalizer (not a Metaspace pre-tokenizer) so that a text already starting with a space still
    # gets its own "▁", and so that each stretch between added tokens gets one, as in llama.cpp.
    steps = [normalizers.Prepend(SPM_SPACE)] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPM_SPACE)])
    decode_steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(decode_steps)
    return hf, _special_tokens(metadata, len(tokens), bos_id=1, eos_id=2, add_bos=True)


def _merges_by_score(tokens: list[str], scores: Sequence[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best-scored result first.

    SentencePiece BPE merges the adjacent pair whose concatenation has the highest score; ranking the
    pairs by that score makes HF's rank-ordered BPE take the same merges.
    """
    ranked = []
    for token_id, text in enumerate(tokens):
        if vocab.get(text) != token_id:
            continue
        for cut in range(1, len(text)):
            left_id, right_id = vocab.get(text[:cut]), vocab.get(text[cut:])
            if left_id is not None and right_id is not None:
                ranked.append((-scores[token_id], token_id, left_id, right_id))
    ranked.sort()
    return [(tokens[left_id], tokens[right_id]) for _, _, left_id, right_id in ranked]


def _byte_level_bpe(metadata: dict, tokens: list[str]) -> tuple[HFTokenizer, _SpecialTokens]:
    # llama.cpp warns and falls back on its default pre-tokenizer when the file names none.
    pre = pre_tokenizer(metadata.get(_PREFIX + "pre") or "default")
    merges = metadata.get(_PREFIX + "merges")
    if not merges:
        raise TokenizerError("the GGUF 'gpt2' tokenizer has no tokenizer.ggml.merges")
    vocab = _vocab(tokens)
    pairs = []
    for merge in merges:
        # The separating space is the first one after the first character (as llama.cpp splits).
        cut = merge.find(" ", 1)
        left, right = merge[:cut], merge[cut + 1:]
        # HF refuses merges outside the vocabulary; llama.cpp never produces them either.
        if cut > 0 and left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
    hf = HFTokenizer(BPE(vocab, pairs, ignore_merges=pre.ignore_merges))
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in pre.splits]
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    return hf, _special_tokens(metadata, len(tokens), bos_id=11 if pre.default_bos else None, eos_id=11,
                               add_bos=pre.add_bos)


def _wordpiece(metadata: dict, tokens: list[str], types: list[int]) -> tuple[HFTokenizer, _SpecialTokens]:
    vocab: dict[str, int] = {}
    for token_id, (text, token_type) in enumerate(zip(tokens, types, strict=True)):
        if token_type in (TokenType.NORMAL, TokenType.UNUSED, TokenType.BYTE):
            # GGUF marks word starts with "▁"; BERT marks continuations with "##".
            text = text[1:] if text.startswith(SPM_SPACE) and len(text) > 1 else "##" + text
        vocab.setdefault(text, token_id)
    unk_id = _token_id(metadata, "unknown_token_id", len(tokens), 100)
    if unk_id is None:
        raise TokenizerError("the GGUF 'bert' tokenizer names no unknown token")
    # llama.cpp puts no length limit on words; HF's default turns words over 100 characters into [UNK].
    hf = HFTokenizer(WordPiece(vocab, unk_token=tokens[unk_id], max_input_chars_per_word=1 << 30))
    # llama.cpp lowercases every WordPiece vocabulary and reduces accented letters to their base letter.
    hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                               lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##")
    # BERT wraps a text in [CLS] ... [SEP]: those play the roles of BOS and EOS here.
    cls_id = _token_id(metadata, "cls_token_id", len(tokens), 101)
    sep_id = _token_id(metadata, "seperator_token_id", len(tokens), 102)
    specials = _SpecialTokens(
        bos_id=_token_id(metadata, "bos_token_id", len(tokens), cls_id),
        eos_id=sep_id,
        pad_id=_token_id(metadata, "padding_token_id", len(tokens), 0),
        add_bos=bool(metadata.get(_PREFIX + "add_bos_token", True)),
        add_eos=bool(metadata.get(_PREFIX + "add_sep_token", True)),
    )
    return hf, specials


def _unigram(metadata: dict, tokens: list[str], types: list[int]) -> tuple[HFTokenizer, _SpecialTokens]:
    scores = metadata.get(_PREFIX + "scores")
    if scores is None or len(scores) < len(tokens):
        raise TokenizerError("the GGUF 't5' tokenizer needs one tokenizer.ggml.scores entry per token")
    # llama.cpp's defaults for 't5' files: no BOS, EOS 1, unknown 2, padding 0; EOS added, BOS not.
    unk_id = _token_id(metadata, "unknown_token_id", len(tokens), 2)
    if unk_id is None:
        raise TokenizerError("the GGUF 't5' tokenizer names no unknown token")
    # llama.cpp's unigram has no byte fallback: a character no piece covers is the unknown token.
    hf = HFTokenizer(Unigram(_unigram_pieces(tokens, scores, types), unk_id=unk_id, byte_fallback=False))
    steps = []
    # llama.cpp's normalization after the charsmap (only " " counts as a space there, hence no \s):
    if metadata.get(_PREFIX + "remove_extra_whitespaces", False):
        # every run of spaces becomes one "▁" before the next word; leading and trailing runs vanish
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " "),
                  normalizers.Prepend(SPM_SPACE)]
    elif metadata.get(_PREFIX + "add_space_prefix", False):
        # one "▁" before the first word; a text of spaces only gets none
        steps += [normalizers.Replace(Regex(r"\A (?= *\z)"), ""), normalizers.Prepend(SPM_SPACE)]
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPM_SPACE)])
    decode_steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if metadata.get(_PREFIX + "remove_extra_whitespaces", False) or metadata.get(_PREFIX + "add_space_prefix"):
        decode_steps.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(decode_steps)
    specials = _special_tokens(metadata, len(tokens), bos_id=None, eos_id=1, add_bos=False, add_eos=True, pad_id=0)
    return hf, specials


def _charsmap_normalizer(metadata: dict) -> Callable[[str], str] | None:
    """The vocabulary's SentencePiece charsmap as a normalization run before `tokenizers` (see charsmap.py)."""
    values = metadata.get(_PREFIX + "precompiled_charsmap")
    if values is None:
        return None
    if isinstance(values, (bytes, bytearray)):
        return CharsMap(bytes(values)).normalize
    if isinstance(values, list) and all(isinstance(v, int) and -128 <= v < 256 for v in values):
        return CharsMap(bytes(v & 0xFF for v in values)).normalize  # an int8 array is accepted as well
    raise TokenizerError("tokenizer.ggml.precompiled_charsmap must be an array of bytes")


def _unigram_pieces(tokens: list[str], scores: Sequence[float], types: list[int]) -> list[tuple[str, float]]:
    """(piece, score) pairs scored as llama.cpp scores them.

    llama.cpp scores user-defined pieces 0 and an unknown character min(normal scores) - 10; `tokenizers`
    takes the minimum over every piece, so pieces scored lower than all normal ones (the -10000 of the
    `[PAD…]` fillers converters append) are raised to that minimum to keep the unknown score the same.
    """
    normal = [float(score) for score, token_type in zip(scores, types, strict=False) if token_type == TokenType.NORMAL]
    floor = min(normal, default=0.0)
    return [(text, 0.0 if token_type == TokenType.USER_DEFINED else max(float(score), floor))
            for text, score, token_type in zip(tokens, scores, types, strict=False)]


def _add_special_tokens(hf: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Register control/unknown tokens as special and user-defined tokens as plain added tokens."""
    special, user_defined = [], []
    for text, token_type in zip(tokens, types, strict=True):
        if token_type in (TokenType.CONTROL, TokenType.UNKNOWN):
            special.append(AddedToken(text, special=True, normalized=False))
        elif token_type == TokenType.USER_DEFINED:
            user_defined.append(AddedToken(text, special=False, normalized=False))
    hf.add_special_tokens(special)
    hf.add_tokens(user_defined)


def _end_of_generation_ids(metadata: dict, tokens: list[str], eos_id: int | None) -> set[int]:
    """EOS plus the end-of-turn tokens chat models stop on (as llama.cpp gathers them)."""
    ids = {eos_id} if eos_id is not None else set()
    for key in ("eot_token_id", "eom_token_id"):
        token_id = _token_id(metadata, key, len(tokens), None)
        if token_id is not None:
            ids.add(token_id)
    ids.update(token_id for token_id, text in enumerate(tokens) if text in _END_OF_TURN_TEXTS)
    return ids


def _vocab(tokens: list[str]) -> dict[str, int]:
    # A text listed twice maps to its last id, as in llama.cpp.
    return {text: token_id for token_id, text in enumerate(tokens)}


def _token_types(metadata: dict, n_tokens: int) -> list[int]:
    types = metadata.get(_PREFIX + "token_type")
    if types is None:
        return [TokenType.NORMAL] * n_tokens
    if len(types) < n_tokens:
        raise TokenizerError("the GGUF tokenizer has fewer token types than tokens")
    return list(types[:n_tokens])


def _token_id(metadata: dict, key: str, n_tokens: int, default: int | None) -> int | None:
    """A `tokenizer.ggml.<key>` id, or `default` when absent or out of range (llama.cpp ignores those)."""
    value = metadata.get(_PREFIX + key)
    if value is None or not 0 <= int(value) < n_tokens:
        return default if default is not None and default < n_tokens else None
    return int(value)
