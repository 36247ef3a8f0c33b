"""The step budget: while decodes run, prefill chunks are capped by the device's measured speed.

Timings are synthetic (powers of two, so the expected caps are exact): no test depends on this machine.
"""

import pytest

from ember.engine.block_manager import BlockManager
from ember.engine.engine import EngineArgs, LLMEngine
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Sequence, SequenceStatus
from ember.engine.step_budget import StepBudget
from ember.sampling_params import SamplingParams
from tests.tiny_models import build_tiny_model, copy_tokenizer


def measured(decode_seconds=0.5, prefill_token_seconds=1 / 64, decodes=4, max_tokens=512) -> StepBudget:
    """A budget that has seen one 512-token prefill-only step and one decode-only step."""
    budget = StepBudget(max_tokens)
    budget.observe(0, 512, 512 * prefill_token_seconds)
    budget.observe(decodes, 0, decode_seconds)
    return budget


def test_without_decodes_prefill_gets_the_whole_budget():
    assert StepBudget(512).prefill_limit(0) == 512
    assert measured().prefill_limit(0) == 512


def test_first_decodes_get_one_decode_only_step_then_the_floor():
    budget = StepBudget(512)
    assert budget.prefill_limit(4) == 0  # nothing to compare a prefill chunk's cost with yet
    budget.observe(4, 0, 0.5)
    assert budget.prefill_limit(4) == 16  # decode time known, prefill cost not: the floor


def test_cap_keeps_a_step_within_twice_a_decode_step():
    # 0.5 s decode step, 1/64 s per prefill token: 32 tokens add one decode step's time.
    assert measured().prefill_limit(4) == 32
    three = StepBudget(512, max_step_ratio=3.0)
    three.observe(0, 512, 8.0)
    three.observe(4, 0, 0.5)
    assert three.prefill_limit(4) == 64


def test_cap_has_a_floor_and_a_ceiling():
    assert measured(decode_seconds=1 / 8).prefill_limit(4) == 16  # 8 tokens would fit: the floor wins
    assert measured(prefill_token_seconds=1 / 65536).prefill_limit(4) == 512  # max_tokens wins
    assert measured(max_tokens=8).prefill_limit(4) == 8  # the floor never exceeds max_tokens


def test_mixed_steps_measure_what_prefill_adds_and_rises_are_believed_at_once():
    budget = measured()
    budget.observe(4, 32, 0.5 + 32 / 32)  # prefill now costs 1/32 s a token
    assert budget.prefill_token_seconds == 1 / 32
    assert budget.prefill_limit(4) == 16
    budget.observe(4, 16, 0.5 + 16 / 128)  # cheaper again: believed only gradually
    assert 1 / 128 < budget.prefill_token_seconds < 1 / 32
    budget.observe(4, 16, 0.25)  # faster than the decodes alone: counts as free, never negative
    assert 0 < budget.prefill_token_seconds


def test_small_prefills_teach_nothing():
    budget = measured()
    budget.observe(4, 8, 100.0)  # 8 tokens: fixed cost and noise, not a per-token figure
    assert budget.prefill_limit(4) == 32


def test_cap_grows_at_most_twice_past_the_largest_measured_chunk():
    budget = StepBudget(512)
    budget.observe(4, 0, 0.5)
    budget.observe(4, 16, 0.5 + 16 / 1024)  # measured on 16 tokens only: 512 would "fit"
    assert budget.prefill_limit(4) == 32
    budget.observe(4, 32, 0.5 + 32 / 1024)
    assert budget.prefill_limit(4) == 64


def test_decode_time_is_remeasured_when_the_number_of_streams_changes_much():
    budget = measured(decodes=4)
    assert budget.prefill_limit(8) == 32 and budget.prefill_limit(2) == 32
    assert budget.prefill_limit(9) == 0 and budget.prefill_limit(1) == 0
    budget.observe(9, 0, 1.0)  # measured afresh, not averaged with the 4-stream time
    assert budget.decode_seconds == 1.0 and budget.prefill_limit(9) == 64


# Scheduler level: sequences without a model, advanced the way LLMEngine.step() advances them.

def advance(scheduler: Scheduler, seconds: float) -> dict[str, int]:
    chunks = scheduler.schedule()
    for chunk in chunks:
        if chunk.samples:
            chunk.seq.token_ids.append(7)
        chunk.seq.num_computed_tokens += chunk.num_tokens
    scheduler.observe_step(seconds)
    return {c.seq.request_id: c.num_tokens for c in chunks}


def test_scheduler_caps_a_long_prompt_beside_decodes_and_not_alone():
    scheduler = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_batched_tokens=512)
    for i in range(4):
        scheduler.add(Sequence(f"short{i}", [1] * 128, None))
    assert advance(scheduler, 8.0) == {f"short{i}": 128 for i in range(4)}  # 1/64 s a prefill token
    scheduler.add(Sequence("long", [2] * 200, None))
    decodes = {f"short{i}": 1 for i in range(4)}
    assert advance(scheduler, 0.5) == decodes  # the decode-only step the cap is measured against
    assert advance(scheduler, 1.0) == decodes | {"long": 32}
    assert advance(scheduler, 1.0) == decodes | {"long": 32}
    for _ in range(4):  # the streams finish: prefill gets the whole budget again
        scheduler.finish(scheduler.running[0])
    assert advance(scheduler, 2.0) == {"long": 136}


def running(scheduler: Scheduler, request_id: str, prompt_len: int, computed: int, outputs: int = 0) -> None:
    seq = Sequence(request_id, [3 + len(scheduler.running) * 100 + i for i in range(prompt_len)], None)
    seq.token_ids += [7] * outputs
    assert scheduler.blocks.allocate(seq)
    seq.num_computed_tokens = computed
    seq.status = SequenceStatus.RUNNING
    scheduler.running.append(seq)


def test_scheduler_skips_capped_prefills_but_not_younger_decodes():
    scheduler = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_batched_tokens=512)
    scheduler.budget = measured(decodes=1)  # 32 prefill tokens beside one decode
    # Prompts older than the stream, e.g. recomputed after a preemption: the first takes the whole cap.
    running(scheduler, "first", 100, 50)
    running(scheduler, "second", 100, 0)
    running(scheduler, "stream", 8, 8, outputs=1)
    scheduler.add(Sequence("new", [5] * 8, None))
    assert advance(scheduler, 1.0) == {"first": 32, "stream": 1}


# Engine level: a tiny model on a simulated device, whose step time depends only on what the step computes.

FIXED, PER_DECODE, PER_PREFILL_TOKEN = 0.25, 1 / 64, 1 / 256
GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


def step_seconds(decodes: int, prefill_tokens: int) -> float:
    return FIXED + PER_DECODE * decodes + PER_PREFILL_TOKEN * prefill_tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, testdata):
    directory = build_tiny_model("llama", tmp_path_factory.mktemp("budget-llama"))
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", directory)
    return directory


def simulated(directory, **args) -> tuple[LLMEngine, list[tuple[int, int]]]:
    """An engine whose clock advances by step_seconds() of each forward; returns it and its steps' shapes."""
    engine = LLMEngine(str(directory), EngineArgs(dtype="float32", device="cpu", block_size=4, **args))
    now = [0.0]
    steps: list[tuple[int, int]] = []
    real_run = engine.runner.run

    def run(chunks):
        decodes = sum(1 for c in chunks if c.seq.num_output_tokens and c.num_tokens == 1)
        steps.append((decodes, sum(c.num_tokens for c in chunks) - decodes))
        now[0] += step_seconds(*steps[-1])
        return real_run(chunks)

    engine.runner.run = run
    engine.clock = lambda: now[0]
    return engine, steps


def drain(engine: LLMEngine, outputs: dict[str, list[int]], until) -> None:
    while not until():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)


def test_engine_chunks_a_long_prompt_under_the_adapted_budget_with_unchanged_outputs(tiny_dir):
    shorts = [[1] + [(5 * i + 3 * j) % 300 + 3 for j in range(12)] for i in range(3)]
    long = [1] + [(11 * j) % 300 + 3 for j in range(199)]
    engine, steps = simulated(tiny_dir, max_batched_tokens=256)
    outputs: dict[str, list[int]] = {}
    for i, prompt in enumerate(shorts):
        engine.add_request(f"short{i}", prompt, GREEDY)
    drain(engine, outputs, lambda: len(outputs) == 3)
    engine.add_request("long", long, GREEDY)
    arrived = len(steps)
    drain(engine, outputs, lambda: "long" in outputs)
    long_steps = steps[arrived:]

    # Unconstrained, the 200-token prompt would be one chunk: a 1.1 s step for streams used to 0.3 s.
    decode_only = step_seconds(3, 0)
    assert long_steps[0] == (3, 0)  # the decode-only step that measures decode_only
    assert all(decodes == 3 for decodes, _ in long_steps)
    assert all(step_seconds(*step) <= 2 * decode_only for step in long_steps)
    assert all(prefill >= 16 for _, prefill in long_steps[1:-1])  # the floor; the last chunk is the rest
    assert sum(prefill for _, prefill in long_steps) == len(long) and len(long_steps) > 3

    drain(engine, outputs, lambda: not engine.has_work())
    for request_id, prompt in [*((f"short{i}", p) for i, p in enumerate(shorts)), ("long", long)]:
        alone, _ = simulated(tiny_dir, max_batched_tokens=256)
        expected: dict[str, list[int]] = {}
        alone.add_request(request_id, prompt, GREEDY)
        drain(alone, expected, lambda alone=alone: not alone.has_work())
        assert outputs[request_id] == expected[request_id], request_id
