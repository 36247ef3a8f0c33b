"""Regenerate tests/data/xlmr-unigram-vocab.gguf and tests/data/llama_cpp_unigram.json: an XLM-R unigram ("t5")
vocabulary small enough to commit, and the token ids llama.cpp gives tricky texts with it.

The full vocabulary (llama.cpp's models/ggml-vocab-nomic-bert-moe.gguf: 250k pieces with scores and
SentencePiece's precompiled normalization charsmap, the vocabulary of multilingual-e5, bge-m3,
nomic-embed-text-v2-moe and bge-reranker-v2-m3) is cut down to the pieces that occur in the texts below
(plus the special tokens and the lowest-scored piece, which sets the unknown-character score), keeping its
charsmap, scores and flags. llama.cpp then tokenizes every text on that exact file twice: as its tokenizer
tests do (no BOS/EOS, special-token text as plain text) and as its server does (BOS/EOS added, special-token
text parsed). tests/test_unigram_vocab.py builds ember's tokenizer from the same file and must reproduce
every line.

Needs a llama.cpp checkout built with its shared library (build/bin/libllama.so) and a C++ compiler:

    PYTHONPATH=. python scripts/unigram_vectors.py /path/to/llama.cpp
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretokenizer_vectors import SEPARATOR, build_tool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB_OUT = ROOT / "tests" / "data" / "xlmr-unigram-vocab.gguf"
IDS_OUT = ROOT / "tests" / "data" / "llama_cpp_unigram.json"
SPM_SPACE = "\u2581"

TEXTS = [
    "Hello world",
    "",
    " ",
    "   ",
    "a  b   c    d",
    "   leading spaces",
    "trailing spaces   ",
    "\n\n\nthree newlines\r\n windows\r\nline \n  indented\n",
    "tabs\tand\t\tmore\ttabs\t",
    "\t\n \r\n\n  \n",
    "ＡＢＣ ａｂｃ！ ？ ＃１２３ full-width",
    "ligatures ﬁne ﬂow ﬀ ﬃ and ½ ² Ⅻ ① ™ … ㎏",
    "naïve café Ångström façade résumé Straße",
    "decomposed e\u0301 a\u0308 n\u0303o",
    "ÉCOLE école ÀÉÎÕÜ",
    "中文测试：你好，世界！这是一个句子。",
    "日本語のテキスト、カタカナとひらがな。ｶﾀｶﾅ",
    "안녕하세요 세계",
    "नमस्ते दुनिया",
    "مرحبا بالعالم",
    "Ελληνικά Ω",
    "🦙🚀 👍🏽 👨‍👩‍👧 ❤️",
    "unknown 𓀀𓀁 ꙮ ᚠᛇᚻ characters",
    "1 12 123 1234 12345 3.14159 1,000,000 $100 2024-01-02",
    "a\u00a0b\u3000c\u2028d\u0085e \u200bf\u200dg \x01\x7f",
    "<s> and </s> and <mask> and <unk> and <pad>",
    # decomposed text and combining marks after mapped characters (where `tokenizers`' Precompiled differs)
    "ひらか\u3099な カ\u3099 e\u0301\u0301 Ａ\u0301 ǅ\u0308 x\u0308\u0301 ﬂ\u0301",
    "Cafe\u0301 re\u0301sume\u0301 A\u030a ﷺ 文\u0670 \u1112\u1161\u11ab",
    "বাংলা ভাষা தமிழ் மொழி हिन्दी",
    "query: how much protein should a female eat",
    "passage: As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 "
    "grams per day.",
    "def f(x):\n    return x**2  # squared",
    "email@example.com https://example.com/path?q=1&r=2#frag",
]


def _candidates(text: str) -> list[str]:
    """Spellings of the text the normalized form may contain pieces of."""
    from tokenizers import normalizers

    forms = {text, unicodedata.normalize("NFKC", text), unicodedata.normalize("NFKD", text)}
    forms |= {form.replace(" ", SPM_SPACE) for form in forms}
    return [SPM_SPACE + form for form in forms] + [form.lower() for form in forms] + [
        normalizers.Replace(" ", SPM_SPACE).normalize_str(f) for f in forms]


def reduced_vocab(source: Path, out: Path) -> None:
    reader = gguf.GGUFReader(source)
    fields = {key: field for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    haystack = "\n".join(c for text in TEXTS for c in _candidates(text))
    normal = [i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL]
    lowest = min(normal, key=lambda i: scores[i])
    keep = [i for i, t in enumerate(types)
            if t != gguf.TokenType.NORMAL and t != gguf.TokenType.UNUSED or i == lowest or tokens[i] in haystack]
    new_id = {old: new for new, old in enumerate(keep)}
    writer = gguf.GGUFWriter(str(out), fields["general.architecture"].contents())
    for key, field in fields.items():
        if key == "general.architecture" or key.startswith("tokenizer.ggml.") and key.endswith(
                ("tokens", "scores", "token_type", "_token_id", "precompiled_charsmap")):
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), value_type)
    writer.add_token_list([tokens[i] for i in keep])
    writer.add_token_scores([scores[i] for i in keep])
    writer.add_token_types([types[i] for i in keep])
    for key, field in fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            writer.add_uint32(key, new_id[field.contents()])
    charsmap = fields["tokenizer.ggml.precompiled_charsmap"]
    writer.add_precompiled_charsmap(bytes(charsmap.contents()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def main() -> None:
    llama_cpp = Path(sys.argv[1])
    for text in TEXTS:
        assert "__ggml_vocab_test__" not in text
    reduced_vocab(llama_cpp / "models" / "ggml-vocab-nomic-bert-moe.gguf", VOCAB_OUT)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tool = build_tool(llama_cpp, work)
        texts_file = work / "texts.inp"
        texts_file.write_text("".join(text + SEPARATOR for text in TEXTS), encoding="utf-8")
        runs = {}
        for mode, extra in (("plain", []), ("special", ["special"])):
            out = subprocess.run([str(tool), str(VOCAB_OUT), "default", str(texts_file), *extra], check=True,
                                 capture_output=True, text=True).stdout.splitlines()
            assert len(out) == len(TEXTS), (mode, len(out))
            runs[mode] = out
    IDS_OUT.write_text(json.dumps({
        "generated_by": "scripts/unigram_vectors.py: llama.cpp's llama_tokenize on tests/data/xlmr-unigram-vocab.gguf"
                        "; plain: no BOS/EOS, special-token text as text; special: BOS/EOS added, specials parsed",
        "texts": TEXTS,
        "plain": runs["plain"],
        "special": runs["special"],
    }, indent=1) + "\n", encoding="utf-8")  # ASCII escapes: no editor can normalize the texts
    print(f"{VOCAB_OUT.stat().st_size} bytes vocabulary, {len(TEXTS)} texts -> {IDS_OUT}")


if __name__ == "__main__":
    main()
