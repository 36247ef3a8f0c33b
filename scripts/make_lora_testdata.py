"""Regenerate tests/data/lora/: a random PEFT adapter for shared/testdata/gguf/tiny-llama-hf, the same adapter
converted by llama.cpp's convert_lora_to_gguf.py, and llama.cpp's outputs with it on GGUF bases.

Needs peft and a llama.cpp tree with llama-server built (neither is needed by the tests that read the files):

    python scripts/make_lora_testdata.py --llama-cpp /work/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp

refs.json holds, per base GGUF, llama.cpp's server (CPU, greedy, n_probs 5) run with `--lora` on the prompts of
shared/testdata/gguf/tiny-llama-refs.json: {prompt_ids, output_ids, top_logprobs} as that file does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata" if (ROOT.parent / "shared").exists() else ROOT / "shared" / "testdata"
OUT = ROOT / "tests" / "data" / "lora"
BASES = ["tiny-llama-bf16.gguf", "tiny-llama-Q4_K_M.gguf"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(base: Path, out: Path) -> None:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    torch.manual_seed(7)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # lora_B starts at zero in PEFT: randomize both so the adapter changes the outputs
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                # float16 values: the GGUF conversion (f16) keeps them exactly, so both files hold one adapter
                p.data = p.data.normal_(0, 0.08).half()
    wrapped.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template


def convert(llama_cpp: Path, base: Path, adapter: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    subprocess.run([sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--base", str(base),
                    "--outtype", "f16", "--outfile", str(out), str(adapter)], check=True, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def llama_cpp_refs(llama_cpp: Path, model: Path, lora: Path, prompts: list[list[int]]) -> list[dict]:
    port = _free_port()
    server = subprocess.Popen([str(llama_cpp / "build" / "bin" / "llama-server"), "-m", str(model), "--lora", str(lora),
                               "--port", str(port), "--host", "127.0.0.1", "-c", "512", "-t", "2", "-np", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        cases = []
        for prompt in prompts:
            out = _post(port, {"prompt": prompt, "n_predict": 24, "n_probs": 5, "temperature": 0.0,
                               "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"], "top_k": 1})
            steps = out["completion_probabilities"]
            cases.append({"prompt_ids": prompt, "output_ids": [s["id"] for s in steps],
                          "top_logprobs": [[[t["id"], t["logprob"]] for t in s["top_logprobs"]] for s in steps]})
        return cases
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp source tree with build/bin")
    args = parser.parse_args()
    hf = TESTDATA / "gguf" / "tiny-llama-hf"
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # The converter wants the base's config and tokenizer only, but reads the folder as a whole model.
        base = Path(tmp) / "base"
        shutil.copytree(hf, base)
        peft_dir = OUT / "peft"
        make_peft_adapter(base, peft_dir)
        gguf = OUT / "tiny-llama-lora-f16.gguf"
        convert(args.llama_cpp, base, peft_dir, gguf)
    prompts = [case["prompt_ids"] for case in
               json.loads((TESTDATA / "gguf" / "tiny-llama-refs.json").read_text())["tiny-llama-bf16.gguf"]]
    refs = {name: llama_cpp_refs(args.llama_cpp, TESTDATA / "gguf" / name, gguf, prompts) for name in BASES}
    (OUT / "refs.json").write_text(json.dumps(refs))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
