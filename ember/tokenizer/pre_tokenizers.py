"""llama.cpp's byte-level BPE pre-tokenizers, one per `tokenizer.ggml.pre` value, as Oniguruma regexes.

llama.cpp (src/llama-vocab.cpp) maps each name a GGUF file may carry in `tokenizer.ggml.pre` to a list of
regexes; text is cut by each regex in turn, every match and every stretch between matches of a piece
becoming its own piece, and BPE merges never cross a cut. Hugging Face `tokenizers` does the same with a
sequence of `Split(..., "isolated")` steps, but its regex engine is Oniguruma, not the std::regex llama.cpp
runs (src/unicode.cpp), so the regexes here are llama.cpp's rewritten to mean in Oniguruma what they
mean there:

- Non-ASCII characters are written as `\\x{...}` escapes: llama.cpp's sources spell some ranges with
  characters that Unicode normalization rewrites (U+1FD3 "ΐ" becomes U+0390), and a normalized copy turns
  `\\x{1FD0}-\\x{1FD3}` into an empty range that Oniguruma rejects.
- Where llama.cpp matches a regex without Unicode categories (std::wregex), it first replaces non-ASCII
  whitespace with U+000B, so a character class written with non-ASCII ranges never matches whitespace:
  such classes are intersected with `\\S` where their ranges hold whitespace (U+3000 ...).
  `\\d` there is ASCII-only: `[0-9]`.
- Where a regex uses `\\p{..}`, llama.cpp matches on a copy of the text with each non-ASCII character
  replaced by one byte per category (letter, number, punctuation, mark, symbol), so `\\p{Lu}`, `\\p{Ll}`,
  `\\p{Lt}`, `\\p{Lm}` and `\\p{Lo}` all mean "letter" (upper- and lowercase are not told apart beyond
  ASCII): they become `\\p{L}`.
- `$` means the end of the piece (`\\z`); Oniguruma's `$` also matches before a newline.
- A few regexes llama.cpp does not run as regexes but by hand (digit grouping, Kimi K2's split): their
  behaviour is written as an equivalent regex.

Values llama.cpp loads but whose tokenizer is not byte-level BPE (Gemma 4-style BPE over raw UTF-8) are
refused with the reason; names llama.cpp does not know are refused as llama.cpp refuses them. Every regex
set is checked against llama.cpp's own splits by tests/test_pretokenizers.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import TokenizerError


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp cuts text before BPE for one `tokenizer.ggml.pre` value."""

    splits: tuple[str, ...]  # Oniguruma regexes, applied in turn
    ignore_merges: bool = False  # a pre-token that is itself a token is not merged from its bytes
    add_bos: bool = False  # BOS is added when the file does not say
    default_bos: bool = True  # without bos_token_id, llama.cpp's BPE default BOS (id 11) applies


@dataclass(frozen=True)
class Refused:
    """A `tokenizer.ggml.pre` value ember does not load, and why."""

    reason: str


_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Letters as llama.cpp's GPT-4o / Tekken regexes test them: "a letter that is not a-z", "... not A-Z".
_NOT_LOWER = r"(?:(?=\p{L})[^a-z])"
_NOT_UPPER = r"(?:(?=\p{L})[^A-Z])"
_GPT4O_WORDS = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_NOT_LOWER}*{_NOT_UPPER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_NOT_LOWER}+{_NOT_UPPER}*{_CONTRACTIONS}?"
)
_DEEPSEEK_V3_WORDS = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
)
# Digit runs cut in threes from the right, any text before a run joining its first group (llama.cpp's
# hand-written AFMoE digit split, also used for Tiny Aya's `\d{1,3}(?=(?:\d{3})*\b)`).
_DIGITS_FROM_RIGHT = r"\P{N}*\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))"
_CJK = r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+"
_DEEPSEEK_CJK = r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}&&\S]+"
_BLOOM = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{964}\x{6D4}\x{60C})]+"
_DEEPSEEK_LLM_LETTERS = (
    r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}"
    r"\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}"
    r"\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}"
    r"\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}"
    r"\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}"
    r"\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}"
    r"\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}"
    r"\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}"
    r"\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}"
    r"\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}"
    r"\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}"
    r"\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}"
    r"\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+"
)
_DEEPSEEK_LLM_PUNCTUATION = r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}&&\S]+"

# Regex lists by llama.cpp pre-tokenizer type (LLAMA_VOCAB_PRE_TYPE_*), in llama.cpp's order.
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_LLAMA3_SPLITS = (_LLAMA3,)
_JAIS2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)"
    r"|\s{1,2}(?!\S)|\s{1}",
)
_DEEPSEEK_LLM = (
    r"[\r\n]", _DEEPSEEK_LLM_LETTERS, _DEEPSEEK_LLM_PUNCTUATION, r"\s+\z", _DEEPSEEK_CJK, r"\p{N}+",
)
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}", _CJK,
    _DEEPSEEK_V3_WORDS + r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_SPARK2_5 = (
    r"\p{N}{1,3}", _CJK,
    _DEEPSEEK_V3_WORDS + r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+",
    r"\p{N}",
)
_YOUTU = (
    r"[\x{AC00}-\x{D7A3}\x{3131}-\x{318E}]+"
    r"|[\x{FF01}\x{2026}\x{201C}\x{201D}\x{2018}\x{2019}\x{2014}\x{FF1A}\x{FF1B}\x{FF0C}\x{3001}-\x{303F}"
    r"\x{FE30}-\x{FE4F}]+|[\x{3105}-\x{312F}]+|" + _CJK,
    rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]*[\p{{L}}\p{{M}}]+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+[\p{{L}}\p{{M}}]*{_CONTRACTIONS}?"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")
_STARCODER = (r"\p{N}", _GPT2)
_GPT2_SPLITS = (_GPT2,)
_QWEN2_SPLITS = (_QWEN2,)
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
    r"|\s+",
)
_BLOOM_SPLITS = (_BLOOM,)
_VIKING = (_BLOOM, r"\p{N}")
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_NOT_LOWER}*{_NOT_UPPER}+|[^\r\n\p{{L}}\p{{N}}]?{_NOT_LOWER}+{_NOT_UPPER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_CHAMELEON = (
    r"<sentinel:[0-9]+>",
    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    r"([\t\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    _GPT2,
)
_GPT4O = (_GPT4O_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
_GRANITE_EMB_MULTI = (
    _GPT4O_WORDS.replace(r"(?=\p{L})", r"(?=[\p{L}\p{M}])")
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_TINY_AYA = (
    _DIGITS_FROM_RIGHT,
    rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]*[\p{{L}}\p{{M}}]+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+[\p{{L}}\p{{M}}]*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# llama.cpp's hand-written split for Kimi K2 (unicode_regex_split_custom_kimi_k2): Han runs (its own
# ranges), words of other letters with an optional contraction, digits in threes, then as Llama 3.
_HAN = (
    r"\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
    r"\x{2B820}-\x{2CEAF}\x{2CEB0}-\x{2EBEF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}"
)
_KIMI_K2 = (
    rf"[{_HAN}]+|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}&&[^{_HAN}]]+{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_SUPERBPE = (r"\p{N}+", r"[0-9]{1,3}(?=(?:[0-9]{3})*(?![0-9]))")
_BAILINGMOE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+",
)
_SEED_CODER = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_UFAKZEKA = (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
_AFMOE = (
    _DIGITS_FROM_RIGHT,
    r"[\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{8C48}-\x{FAFF}\x{3040}-\x{309F}\x{30A0}-\x{30FF}\x{FF65}-\x{FF9F}"
    r"\x{2F00}-\x{2FDF}\x{E40}-\x{E7F}\x{E80}-\x{EFF}\x{1780}-\x{17FF}\x{1000}-\x{109F}\x{AA60}-\x{AA7F}"
    r"\x{A9E0}-\x{A9FF}\x{AC00}-\x{D7AF}\x{1100}-\x{11FF}]+",
    _DEEPSEEK_V3_WORDS + r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_LAGUNA = (r"[^\n]+|[\n]+", _QWEN2)
_EXAONE_MOE = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
    r"|\s*[\r\n]|\s+(?!\S)|\s+",
)
_MINICPM5 = (
    r"\p{N}{1,3}",
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)

_RAW_UTF8 = Refused(
    "llama.cpp runs this vocabulary as BPE over raw UTF-8 with SentencePiece-style spaces, not byte-level "
    "BPE; ember does not support that tokenizer"
)


_UNKNOWN = Refused("llama.cpp does not know this name either")


def _names(names: str, entry: PreTokenizer | Refused) -> dict[str, PreTokenizer | Refused]:
    return dict.fromkeys(names.split(), entry)


# Every value llama.cpp's vocabulary loader accepts (llama_vocab::impl::load), with its flags.
PRE_TOKENIZERS: dict[str, PreTokenizer | Refused] = {
    "default": PreTokenizer(_DEFAULT),
    "minicpm5": PreTokenizer(_MINICPM5, ignore_merges=True),
    **_names("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
             PreTokenizer(_LLAMA3_SPLITS, ignore_merges=True, add_bos=True)),
    "deepseek-llm": PreTokenizer(_DEEPSEEK_LLM),
    "deepseek-coder": PreTokenizer(_DEEPSEEK_CODER),
    **_names("deepseek-v3 hunyuan-dense hy_v4 joyai-llm", PreTokenizer(_DEEPSEEK_V3)),
    "spark2_5": PreTokenizer(_SPARK2_5),
    "youtu": PreTokenizer(_YOUTU, ignore_merges=True),
    "falcon": PreTokenizer(_FALCON),
    **_names("gpt-2 mpt olmo jais trillion granite-docling phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de "
             "a.x-4.0 mellum modern-bert jina-v1-en jina-v2-code roberta-bpe exaone4", PreTokenizer(_GPT2_SPLITS)),
    **_names("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2", PreTokenizer(_STARCODER)),
    "jais-2": PreTokenizer(_JAIS2),
    **_names("gemma4 granite-embed-multi-311m sarvam-moe", _RAW_UTF8),
    "whitespace": Refused(
        "llama.cpp splits this vocabulary at whitespace and runs BPE over raw UTF-8, not byte-level BPE; "
        "ember does not support that tokenizer"
    ),
    **_names("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2",
             PreTokenizer(_QWEN2_SPLITS)),
    "qwen35": PreTokenizer(_QWEN35),
    **_names("dbrx smaug-bpe", PreTokenizer(_LLAMA3_SPLITS)),
    **_names("poro-chat bloom gpt3-finnish", PreTokenizer(_BLOOM_SPLITS)),
    # ChatGLM: llama.cpp clears the default BOS id.
    "chatglm-bpe": PreTokenizer(_LLAMA3_SPLITS, default_bos=False),
    **_names("glm4 glm5", PreTokenizer(_LLAMA3_SPLITS, ignore_merges=True, default_bos=False)),
    "viking": PreTokenizer(_VIKING),
    "tekken": PreTokenizer(_TEKKEN, ignore_merges=True, add_bos=True),
    "exaone-moe": PreTokenizer(_EXAONE_MOE),
    "chameleon": PreTokenizer(_CHAMELEON, add_bos=True),
    **_names("gpt-4o llama4 kanana2 talkie minimax-m2", PreTokenizer(_GPT4O)),
    "granite-embed-multi-97m": PreTokenizer(_GRANITE_EMB_MULTI, ignore_merges=True),
    **_names("tiny_aya cohere2moe", PreTokenizer(_TINY_AYA)),
    "superbpe": PreTokenizer(_SUPERBPE),
    **_names("bailingmoe bailingmoe2 llada-moe", PreTokenizer(_BAILINGMOE)),
    "seed-coder": PreTokenizer(_SEED_CODER),
    "kimi-k2": PreTokenizer(_KIMI_K2),
    "ufakzeka": PreTokenizer(_UFAKZEKA),
    "afmoe": PreTokenizer(_AFMOE),
    "laguna": PreTokenizer(_LAGUNA),
}


def pre_tokenizer(name: str) -> PreTokenizer:
    """The pre-tokenizer for a `tokenizer.ggml.pre` value, or a TokenizerError naming it."""
    entry = PRE_TOKENIZERS.get(name, _UNKNOWN)
    if isinstance(entry, Refused):
        raise TokenizerError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={name!r}: {entry.reason}")
    return entry
