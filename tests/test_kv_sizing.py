"""How big a KV cache each way of running a model holds, that the CPU cache takes RAM only as it fills,
and -t/--threads (EngineArgs.threads)."""

from __future__ import annotations

import json
import sys

import psutil
import pytest
import torch

import ember.engine.engine as engine_module
from ember.cli.main import main
from ember.engine.engine import EngineArgs, LLMEngine
from ember.engine.model_runner import ModelRunner
from ember.errors import InvalidParameter
from ember.llm import LLM
from ember.loader.model import load_model
from tests.tiny_models import TINY, build_tiny_model, copy_tokenizer

CONTEXT = TINY["max_position_embeddings"]  # 256


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, testdata):
    directory = build_tiny_model("llama", tmp_path_factory.mktemp("kv-llama"))
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", directory)
    return directory


@pytest.fixture
def built(monkeypatch) -> list[LLMEngine]:
    """Every engine a CLI command builds in this test."""
    engines = []

    class Recording(LLMEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(engine_module, "LLMEngine", Recording)
    return engines


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def kv_tokens(engine: LLMEngine) -> int:
    slots = engine.num_blocks * engine.args.block_size
    assert engine.runner.k_cache.shape[1] == engine.runner.v_cache.shape[1] == slots
    return slots


@pytest.fixture(scope="module")
def chat_model(testdata) -> str:
    return str(testdata / "gguf" / "tiny-llama-hf")  # a real tokenizer for text prompts; context 4096


@pytest.mark.parametrize("extra, context, tokens", [([], 4096, 4096), (["--max-model-len", "100"], 100, 112)])
def test_run_holds_one_context(chat_model, built, capsys, extra, context, tokens):
    """One stream: the model's context (or --max-model-len) in whole 16-token blocks, not 32 of them."""
    assert main(["run", chat_model, "hi", "--raw", "--max-tokens", "2", *extra]) == 0
    (engine,) = built
    assert engine.loaded.config.max_position_embeddings == 4096
    assert engine.args.max_num_seqs == 1 and engine.max_model_len == context
    assert kv_tokens(engine) == tokens


def test_bench_holds_its_largest_batch(tiny_dir, built, capsys):
    assert main(["bench", str(tiny_dir), "-p", "20", "-n", "4", "-c", "1,3", "-r", "1", "--no-warmup",
                 "--output", "json"]) == 0
    (engine,) = built
    assert engine.max_model_len == 21  # the 20-token prompt and its sampled token
    assert kv_tokens(engine) == 3 * 32  # 3 sequences of 21 tokens, 2 blocks each
    record = json.loads(capsys.readouterr().out)
    assert all(r["preemptions"] == 0 for r in record["results"])


def test_python_api_default_is_max_num_seqs_contexts(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu", max_num_seqs=4)
    assert kv_tokens(llm.engine) == 4 * CONTEXT


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS of untouched anonymous pages: Linux")
def test_cpu_cache_takes_memory_as_it_fills(tiny_dir):
    loaded = load_model(str(tiny_dir), dtype="float32", device="cpu")
    process = psutil.Process()
    before = process.memory_info().rss
    # 2 caches × 2 layers × 2^20 slots × 2 heads × 16 × 4 bytes = 512 MiB reserved.
    runner = ModelRunner(loaded.model, loaded.config, torch.device("cpu"), torch.float32, 16, 2**16)
    grown = process.memory_info().rss - before
    assert runner.k_cache.numel() * 4 * 2 == 2**29
    assert grown < 2**26, f"an empty cache took {grown / 2**20:.0f} MiB"
    assert not runner.k_cache[:, -16:].any() and not runner.v_cache[:, :16].any()


def test_threads_set_torch_threads(tiny_dir, chat_model, built, capsys, restore_threads):
    wanted = 1 if restore_threads != 1 else 2
    assert main(["run", chat_model, "hi", "--raw", "--max-tokens", "1", "-t", str(wanted)]) == 0
    assert built[0].args.threads == wanted
    assert torch.get_num_threads() == wanted
    torch.set_num_threads(restore_threads)
    LLM(str(tiny_dir), device="cpu", threads=wanted)
    assert torch.get_num_threads() == wanted


@pytest.mark.parametrize("threads", [0, -2, 1.5, True, "4"])
def test_bad_threads_name_the_field(threads):
    with pytest.raises(InvalidParameter, match="^threads: must be a positive integer"):
        EngineArgs(threads=threads)
