"""Regenerate tests/data/llama_cpp_pretokenizers.json: llama.cpp's token ids for every `tokenizer.ggml.pre`.

llama.cpp picks its pre-tokenizer (the regexes that cut text into words before BPE merges) by the name in
`tokenizer.ggml.pre`. This script writes the synthetic vocabulary of tests/pretokenizer_vocab.py (every
short substring of the texts below is one token, so ids show where text was cut) to a GGUF file, loads it
in llama.cpp once per pre-tokenizer name llama.cpp knows (the name set with a metadata override), and
records the tokens llama.cpp produces for texts chosen to hit every regex branch (digit runs, CJK, Korean,
Hindi, contractions, emoji, whitespace runs, newlines, accented and full-width letters ...).
tests/test_pretokenizers.py builds ember's tokenizer from the same vocabulary and name and must reproduce
every line.

Needs a llama.cpp checkout built with its shared library (build/bin/libllama.so) and a C++ compiler:

    PYTHONPATH=. python scripts/pretokenizer_vectors.py /path/to/llama.cpp

Names come from llama.cpp's src/llama-vocab.cpp (every `tokenizer_pre == "..."`); a name llama.cpp refuses
to load is recorded as refused. Results are stored once per distinct result to keep the file small, each
text's ids on one line, as in llama.cpp's .out files (the test shows the pieces when they differ).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.pretokenizer_vocab import write_synthetic_gguf

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "tests" / "data" / "llama_cpp_pretokenizers.json"
TOOL_SOURCE = Path(__file__).with_name("llama_tokenize_vectors.cpp")
SEPARATOR = "\n__ggml_vocab_test__\n"

TEXTS = [
    "Hello world",
    " Hello World! HELLO",
    "I'm don't we'll you've they'd it's WE'LL IT'S O'Neil's 's",
    "1 12 123 1234 12345 123456 1234567 12345678901234567890",
    "3.14159 1,000,000 $100 +50% -7 2024-01-02 v1.2.3",
    "abc123def 4567xyz x1y22z333",
    "١٢٣ ٤٥٦٧ ½ ² ³ Ⅻ ①②",
    "中文测试：你好，世界！这是一个句子。",
    "日本語のテキスト、カタカナとひらがな。",
    "안녕하세요 세계 한국어 텍스트",
    "नमस्ते दुनिया, यह हिन्दी है।",
    "สวัสดีครับ ภาษาไทย",
    "مرحبا بالعالم ١٢",
    "naïve café Ångström façade résumé Straße",
    "ÉCOLE école ÀÉÎÕÜ aÉb Éa",
    "Ελληνικά ΐ Ω K ℹ µ ϐ",
    "ＡＢＣ ａｂｃ！ ？ ＃１２３",
    "e\u0301 a\u0308 n\u0303o",
    "🦙🚀 👍🏽 👨‍👩‍👧 ❤️ 🇺🇸",
    "a  b   c    d\t\te",
    "   leading spaces",
    "trailing spaces   ",
    "\n\n\nthree newlines\r\n windows\r\nline \n  indented\n",
    "\t\n \r\n\n  \n",
    "a\u00a0b\u3000c\u2028d\u0085e \u3000\u3000 f",
    "def f(x):\n    return x**2  # squared\n\nif __name__ == \"__main__\":\n\tprint(f(3))",
    "!!! ??? ... --- ((())) <tag attr=\"v\">&amp;</tag> a/b\\c",
    "camelCase XMLHttpRequest HTTPServer iPhone McDonald's",
    "a\u200bb\u200dc \x01\x7f",
    "<sentinel:0> <sentinel:12> IMGIMGABZ IMGIMGAAAAZ",
    "wait...what?!  (yes) [no] {maybe}",
    "email@example.com https://example.com/path?q=1&r=2#frag",
    " " * 20 + "x" + " " * 9 + "\n" + " " * 5,
    "Tiếng Việt có dấu, Türkçe'nin İstanbul'da",
    "‘quoted’ “double” 「括弧」 《书名》 — …",
    "#1 @user $var %d ^_^ ~/path `code` |pipe|",
]


def pre_names(llama_cpp: Path) -> list[str]:
    """Every `tokenizer.ggml.pre` value llama.cpp's vocabulary loader names, in source order."""
    source = (llama_cpp / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")
    names = ["default"]
    for name in re.findall(r'tokenizer_pre\s*==\s*"([^"]+)"', source):
        if name not in names:
            names.append(name)
    return names


def build_tool(llama_cpp: Path, work: Path) -> Path:
    tool = work / "llama_tokenize_vectors"
    lib = llama_cpp / "build" / "bin"
    subprocess.run(
        ["g++", "-O1", "-std=c++17", f"-I{llama_cpp / 'include'}", f"-I{llama_cpp / 'ggml' / 'include'}",
         str(TOOL_SOURCE), f"-L{lib}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}", "-o", str(tool)],
        check=True,
    )
    return tool


def main() -> None:
    llama_cpp = Path(sys.argv[1])
    real_vocab = llama_cpp / "models" / "ggml-vocab-deepseek-coder.gguf"
    for text in TEXTS:
        assert "__ggml_vocab_test__" not in text
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tool = build_tool(llama_cpp, work)
        vocab = work / "vocab.gguf"
        write_synthetic_gguf(vocab, TEXTS, "default")  # the name is overridden per run
        texts_file = work / "texts.inp"
        texts_file.write_text("".join(text + SEPARATOR for text in TEXTS), encoding="utf-8")
        results: list[list[str]] = []
        by_pre: dict[str, int | str] = {}
        for name in pre_names(llama_cpp):
            run = subprocess.run([str(tool), str(vocab), name, str(texts_file)], capture_output=True, text=True)
            out = run.stdout.splitlines()
            if out == ["REFUSED"] or run.returncode != 0:
                # Refused at load, or (raw-UTF-8 BPE types on a byte-level vocabulary) aborted on a text.
                by_pre[name] = "refused" if out == ["REFUSED"] else f"aborted (exit {run.returncode})"
                continue
            assert len(out) == len(TEXTS), (name, len(out))
            if out not in results:
                results.append(out)
            by_pre[name] = results.index(out)
        unknown = subprocess.run([str(tool), str(vocab), "no-such-pre", str(texts_file)], check=True,
                                 capture_output=True, text=True).stdout.splitlines()
        # One real vocabulary too: DeepSeek LLM's pre-tokenizer over DeepSeek Coder's vocabulary (the shared
        # test data has the latter, not the former), as ids.
        real = subprocess.run([str(tool), str(real_vocab), "deepseek-llm", str(texts_file)], check=True,
                              capture_output=True, text=True).stdout.splitlines()
    OUTPUT.write_text(json.dumps({
        "generated_by": "scripts/pretokenizer_vectors.py: llama.cpp's llama_tokenize (no BOS/EOS, no special "
                        "tokens parsed) on the synthetic vocabulary of tests/pretokenizer_vocab.py",
        "texts": TEXTS,
        "results": results,
        "by_pre": by_pre,
        "no-such-pre": "refused" if unknown == ["REFUSED"] else "loaded",
        "deepseek_llm_on_deepseek_coder_vocab": real,
    }, indent=1) + "\n", encoding="utf-8")  # ASCII escapes: no editor can normalize the texts
    print(f"{len(by_pre)} names, {len(results)} distinct results -> {OUTPUT}")


if __name__ == "__main__":
    main()
