import math
from collections import Counter

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from ember.layers.sampler import Sampler, SamplingState
from ember.sampling_params import SamplingParams

# A hand-made next-token distribution: the filters below are checked against what it implies.
PROBS = [0.5, 0.25, 0.15, 0.07, 0.03]
LOGITS = torch.tensor(PROBS).log()
DRAWS = 2000


def state(params=None, seed=None, prompt=(1, 2), output=(), eos=frozenset()):
    params = params or SamplingParams()
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return SamplingState(
        params=params, generator=generator, prompt_token_ids=list(prompt), output_token_ids=list(output),
        eos_token_ids=eos,
    )


def frequencies(params: SamplingParams) -> dict[int, float]:
    """Draw DRAWS tokens from the hand-made distribution with one fixed generator."""
    generator = torch.Generator().manual_seed(0)
    states = [SamplingState(params, generator, [], []) for _ in range(DRAWS)]
    tokens, _ = Sampler()(LOGITS.expand(DRAWS, -1).clone(), states)
    return {token: count / DRAWS for token, count in Counter(tokens).items()}


def assert_distribution(params: SamplingParams, expected: dict[int, float]):
    seen = frequencies(params)
    assert set(seen) <= set(expected), f"excluded tokens drawn: {set(seen) - set(expected)}"
    total = sum(expected.values())
    for token, mass in expected.items():
        assert seen.get(token, 0.0) == pytest.approx(mass / total, abs=0.04), token


def test_greedy_is_argmax():
    logits = torch.randn(6, 100)
    tokens, logprobs = Sampler()(logits, [state(SamplingParams(temperature=0)) for _ in range(6)])
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs == [None] * 6


def test_top_k_1_is_greedy():
    logits = torch.randn(8, 300)
    tokens, _ = Sampler()(logits, [state(SamplingParams(top_k=1), seed=i) for i in range(8)])
    assert tokens == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_stay_argmax():
    logits = torch.randn(4, 50)
    states = [state(SamplingParams(temperature=0)), state(seed=1), state(SamplingParams(temperature=0)), state()]
    tokens, _ = Sampler()(logits, states)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_logits_are_not_modified():
    logits = torch.randn(2, 20)
    before = logits.clone()
    Sampler()(logits, [state(SamplingParams(repetition_penalty=2.0, logit_bias={3: 5}), seed=1), state()])
    assert torch.equal(logits, before)


def test_temperature_one_follows_the_distribution():
    assert_distribution(SamplingParams(), dict(enumerate(PROBS)))


def test_unseeded_rows_follow_the_distribution():
    torch.manual_seed(0)
    tokens, _ = Sampler()(LOGITS.expand(DRAWS, -1).clone(), [state() for _ in range(DRAWS)])
    counts = Counter(tokens)
    for token, mass in enumerate(PROBS):
        assert counts[token] / DRAWS == pytest.approx(mass, abs=0.04)


def test_temperature_sharpens():
    # p_i^(1/T) renormalised, T = 0.5 squares the probabilities.
    assert_distribution(SamplingParams(temperature=0.5), {i: p * p for i, p in enumerate(PROBS)})


def test_top_k():
    assert_distribution(SamplingParams(top_k=2), {0: 0.5, 1: 0.25})


def test_top_p_keeps_the_smallest_set_reaching_p():
    # cumulative mass before each token: 0, .5, .75, .9, .97 -> with p = .8 tokens 0..2 remain
    assert_distribution(SamplingParams(top_p=0.8), {0: 0.5, 1: 0.25, 2: 0.15})
    assert_distribution(SamplingParams(top_p=0.3), {0: 1.0})


def test_top_p_applies_after_top_k():
    # after top-k=3 the mass is .556, .278, .167: mass before token 2 is .833 >= .6, so it goes.
    assert_distribution(SamplingParams(top_k=3, top_p=0.6), {0: 0.5, 1: 0.25})


def test_min_p_is_relative_to_the_best_token():
    assert_distribution(SamplingParams(min_p=0.4), {0: 0.5, 1: 0.25})  # floor .2
    assert_distribution(SamplingParams(min_p=0.25), {0: 0.5, 1: 0.25, 2: 0.15})  # floor .125


def test_filters_vectorise_over_rows_with_different_params():
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.8), SamplingParams(min_p=0.4), SamplingParams()]
    generator = torch.Generator().manual_seed(3)
    states = [SamplingState(params[i % 4], generator, [], []) for i in range(4 * 400)]
    tokens, _ = Sampler()(LOGITS.expand(len(states), -1).clone(), states)
    assert max(tokens[0::4]) <= 1 and max(tokens[1::4]) <= 2 and max(tokens[2::4]) <= 1
    assert max(tokens[3::4]) >= 3  # the unfiltered rows still reach the tail


def run_steps(params_by_row: list[SamplingParams], seeds: list[int | None], steps: int = 12) -> list[list[int]]:
    """Generate `steps` tokens per row over fixed pseudo-model logits, feeding tokens back as a model would."""
    table = torch.randn(64, 64, generator=torch.Generator().manual_seed(42))
    states = [state(p, seed=s, prompt=[5]) for p, s in zip(params_by_row, seeds, strict=True)]
    sampler = Sampler()
    for _ in range(steps):
        last = [(s.output_token_ids or s.prompt_token_ids)[-1] for s in states]
        tokens, _ = sampler(table[last], states)
        for s, token in zip(states, tokens, strict=True):
            s.output_token_ids.append(token)
    return [s.output_token_ids for s in states]


def test_same_seed_same_tokens_different_seed_differs():
    params = SamplingParams(temperature=1.5)
    first, second, other = run_steps([params] * 3, [7, 7, 8])
    assert first == second
    assert first != other


def test_seeded_output_does_not_depend_on_the_batch():
    params = SamplingParams(top_p=0.9, top_k=40, repetition_penalty=1.2)
    alone = run_steps([params], [1234])[0]
    neighbours = [SamplingParams(temperature=0), SamplingParams(min_p=0.1), params, SamplingParams(top_k=3)]
    batched = run_steps(neighbours + [params], [None, 5, 99, None, 1234])[-1]
    assert batched == alone


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(3, 40) * 3
    rows = [
        state(SamplingParams(repetition_penalty=1.3), prompt=[1, 2, 2, 5], output=[7, 1]),
        state(SamplingParams(repetition_penalty=1.0), prompt=[3], output=[4]),
        state(SamplingParams(repetition_penalty=0.7), prompt=[9, 10, 39], output=[]),
    ]
    adjusted = Sampler.adjust_logits(logits, rows)
    for row, s in enumerate(rows):
        ids = torch.tensor([s.prompt_token_ids + s.output_token_ids])
        expected = RepetitionPenaltyLogitsProcessor(s.params.repetition_penalty)(ids, logits[row : row + 1].clone())
        torch.testing.assert_close(adjusted[row], expected[0])


@pytest.mark.parametrize("window", [1, 3, 5, 64])
def test_repetition_window_penalizes_only_the_last_tokens(window):
    """Ollama's repeat_last_n: transformers' penalty applied to the last `window` ids of prompt + output."""
    logits = torch.randn(1, 40) * 3
    row = state(SamplingParams(repetition_penalty=1.5, repetition_window=window), prompt=[1, 2, 9, 5], output=[7, 3])
    adjusted = Sampler.adjust_logits(logits, [row])
    ids = torch.tensor([(row.prompt_token_ids + row.output_token_ids)[-window:]])
    expected = RepetitionPenaltyLogitsProcessor(1.5)(ids, logits.clone())
    torch.testing.assert_close(adjusted[0], expected[0])
    if window < 6:
        assert not torch.equal(adjusted, Sampler.adjust_logits(
            logits, [state(SamplingParams(repetition_penalty=1.5), prompt=[1, 2, 9, 5], output=[7, 3])]))


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(2, 6)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.3)
    adjusted = Sampler.adjust_logits(logits, [state(params, prompt=[4], output=[2, 2, 3]), state(prompt=[2])])
    torch.testing.assert_close(adjusted[0], torch.tensor([0, 0, -1.1, -0.8, 0, 0]))
    torch.testing.assert_close(adjusted[1], torch.zeros(6))


def test_negative_presence_penalty_encourages():
    adjusted = Sampler.adjust_logits(torch.zeros(1, 4), [state(SamplingParams(presence_penalty=-1.0), output=[1])])
    assert adjusted[0].tolist() == [0, 1, 0, 0]


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = torch.randn(3, 30)
    rows = [
        state(SamplingParams(logprobs=5, temperature=0.3, repetition_penalty=2.0, top_k=3), seed=1, output=[4]),
        state(),
        state(SamplingParams(logprobs=0, temperature=0)),
    ]
    tokens, logprobs = Sampler()(logits, rows)
    reference = torch.log_softmax(logits, dim=-1)
    first = logprobs[0]
    assert first.token_id == tokens[0]
    assert first.logprob == pytest.approx(reference[0, tokens[0]].item(), abs=1e-6)
    values, ids = reference[0].topk(5)
    assert [t for t, _ in first.top] == ids.tolist()
    assert [v for _, v in first.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert logprobs[1] is None
    assert logprobs[2].top == [] and logprobs[2].logprob == pytest.approx(reference[2].max().item(), abs=1e-6)


def test_logit_bias_bans_and_forces():
    logits = torch.zeros(200, 10)
    logits[:, 3] = 10.0
    banned, _ = Sampler()(logits, [state(SamplingParams(logit_bias={3: -100}), seed=i) for i in range(200)])
    assert 3 not in banned
    forced, _ = Sampler()(logits, [state(SamplingParams(logit_bias={"7": 100}), seed=i) for i in range(200)])
    assert set(forced) == {7}
    greedy, _ = Sampler()(logits[:1], [state(SamplingParams(temperature=0, logit_bias={7: 100}))])
    assert greedy == [7]


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, 0], logits[0, 5], logits[0, 2] = 9.0, 8.0, 7.0
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5])
    assert Sampler()(logits, [state(params, output=[1], eos=frozenset({0}))])[0] == [2]
    assert Sampler()(logits, [state(params, output=[1, 1], eos=frozenset({0}))])[0] == [0]
    # ignore_eos: the engine passes no eos ids, so only the stop ids are banned
    assert Sampler()(logits, [state(params, output=[1])])[0] == [0]


def test_min_tokens_holds_for_sampled_rows():
    logits = torch.full((100, 4), -5.0)
    logits[:, 0] = 5.0
    rows = [state(SamplingParams(min_tokens=1), seed=i, eos=frozenset({0})) for i in range(100)]
    tokens, _ = Sampler()(logits, rows)
    assert 0 not in tokens


def test_rows_must_match_states():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), [state()])


def test_large_vocab_top_p_runs_and_keeps_probabilities_finite():
    logits = torch.randn(4, 32000) * 4
    rows = [state(SamplingParams(top_p=0.95, temperature=0.7), seed=i) for i in range(4)]
    tokens, _ = Sampler()(logits, rows)
    assert all(0 <= t < 32000 and math.isfinite(logits[i, t].item()) for i, t in enumerate(tokens))
