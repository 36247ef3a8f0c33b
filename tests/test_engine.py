"""The batching engine: batching, chunked prefill and preemption never change greedy outputs."""

import asyncio

import pytest

from ember.engine.async_engine import AsyncEngine
from ember.engine.engine import EngineArgs, LLMEngine
from ember.errors import InvalidParameter
from ember.llm import LLM
from ember.sampling_params import SamplingParams
from ember.store.memory import kv_bytes_per_token
from tests.tiny_models import build_tiny_model, copy_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, testdata):
    directory = build_tiny_model("llama", tmp_path_factory.mktemp("engine-llama"))
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", directory)
    return directory


def prompts(count: int) -> list[list[int]]:
    return [[1] + [(7 * i + 13 * j) % 300 + 3 for j in range(5 + 3 * i)] for i in range(count)]


def make_llm(directory, **args) -> LLM:
    return LLM(str(directory), dtype="float32", device="cpu", **args)


def test_batched_preempted_outputs_equal_single_runs(tiny_dir):
    batch = prompts(16)
    alone = make_llm(tiny_dir, max_num_seqs=1)
    expected = [alone.generate([p], GREEDY)[0].token_ids for p in batch]
    # 4-token blocks, 7-token budget (chunked prefill), and a cache far smaller than 16 sequences need.
    per_token = kv_bytes_per_token(alone.engine.loaded.config, alone.engine.loaded.dtype.itemsize)
    tight = make_llm(tiny_dir, block_size=4, max_batched_tokens=7, kv_memory=40 * 4 * per_token,
                     max_num_seqs=16, max_model_len=100)
    got = tight.generate(batch, GREEDY)
    assert tight.engine.scheduler.num_preemptions > 0, "the test must force preemption"
    assert [o.token_ids for o in got] == expected
    assert tight.engine.block_manager.num_used_blocks == 0


def test_prefix_cache_hits_and_same_output(tiny_dir):
    llm = make_llm(tiny_dir, block_size=16)
    shared = [1] + [(i * 11) % 300 + 3 for i in range(199)]
    llm.generate([shared + [5, 6, 7]], GREEDY)
    cold = make_llm(tiny_dir, block_size=16).generate([shared + [8, 9]], GREEDY)[0]
    warm = llm.generate([shared + [8, 9]], GREEDY)[0]
    assert warm.cached_tokens >= 192
    assert warm.token_ids == cold.token_ids
    assert cold.cached_tokens == 0


def test_prompt_too_long_is_rejected(tiny_dir):
    llm = make_llm(tiny_dir, max_model_len=32)
    with pytest.raises(InvalidParameter, match="more than the context"):
        llm.generate([[1] * 40], GREEDY)
    with pytest.raises(InvalidParameter, match="token ids"):
        llm.generate([[1, 10**9]], GREEDY)


def test_max_tokens_and_length_finish(tiny_dir):
    out = make_llm(tiny_dir).generate([[1, 5, 6]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_across_batches(tiny_dir):
    llm = make_llm(tiny_dir)
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([[1, 9, 8, 7]], params)[0].token_ids
    together = llm.generate([[1, 9, 8, 7], [1, 3, 3], [1, 4, 4, 4, 4]], params)[0].token_ids
    assert alone == together
    other = llm.generate([[1, 9, 8, 7]], SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True))
    assert other[0].token_ids != alone


def test_async_abort_frees_blocks(tiny_dir):
    engine = AsyncEngine(LLMEngine(str(tiny_dir), EngineArgs(dtype="float32", device="cpu")))

    async def scenario():
        await engine.start()
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

        async def consume(i):
            async for out in engine.generate(f"r{i}", prompts(8)[i], params):
                if out.completion_tokens >= 3:
                    break  # leaving the stream aborts the request

        await asyncio.gather(*(consume(i) for i in range(8)))
        for _ in range(100):
            if engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        await engine.shutdown()
        return stats

    stats = asyncio.run(scenario())
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


def test_async_stream_matches_offline(tiny_dir):
    llm = make_llm(tiny_dir)
    expected = llm.generate([prompts(3)[2]], GREEDY)[0]
    engine = AsyncEngine(llm.engine)

    async def scenario():
        await engine.start()
        text, ids = "", []
        async for out in engine.generate("s", prompts(3)[2], GREEDY):
            text += out.text_delta
            ids += out.token_ids
        await engine.shutdown()
        return text, ids

    text, ids = asyncio.run(scenario())
    assert ids == expected.token_ids and text == expected.text
