import math
from dataclasses import replace

import pytest

from ember.errors import InvalidParameter
from ember.sampling_params import SamplingParams


def test_defaults():
    params = SamplingParams()
    assert params.n == 1 and params.max_tokens == 256 and params.temperature == 1.0
    assert params.stop == [] and params.stop_token_ids == [] and params.logit_bias == {}
    assert params.logprobs is None and params.seed is None and not params.is_greedy


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0), ("n", 17), ("n", True), ("n", 1.0),
        ("max_tokens", -1), ("max_tokens", 1_000_001), ("max_tokens", "5"),
        ("min_tokens", -1),
        ("temperature", -0.1), ("temperature", 2.01), ("temperature", math.nan), ("temperature", math.inf),
        ("temperature", True), ("temperature", "1"),
        ("top_k", -2), ("top_k", 1.5), ("top_k", False),
        ("top_p", 0.0), ("top_p", 1.1), ("top_p", math.nan),
        ("min_p", -0.01), ("min_p", 1.01),
        ("repetition_penalty", 0.0), ("repetition_penalty", 10.5), ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5), ("frequency_penalty", -2.5), ("frequency_penalty", math.inf),
        ("seed", -1), ("seed", 2**63), ("seed", 1.0), ("seed", True),
        ("stop", ""), ("stop", [""]), ("stop", ["x" * 513]), ("stop", ["a"] * 17), ("stop", [1]), ("stop", 5),
        ("stop_token_ids", [-1]), ("stop_token_ids", list(range(65))), ("stop_token_ids", [True]),
        ("stop_token_ids", 3),
        ("ignore_eos", 1), ("skip_special_tokens", "yes"), ("include_stop_str_in_output", None),
        ("logprobs", -1), ("logprobs", 21), ("logprobs", True),
        ("logit_bias", {1: 100.5}), ("logit_bias", {1: math.nan}), ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"x": 1.0}), ("logit_bias", {"-3": 1.0}), ("logit_bias", {1.5: 1.0}),
        ("logit_bias", {i: 1.0 for i in range(1025)}), ("logit_bias", [1, 2]), ("logit_bias", {1: True}),
    ],
)
def test_rejects_out_of_range_and_wrong_types(field, value):
    with pytest.raises(InvalidParameter) as error:
        SamplingParams(**{field: value})
    assert error.value.field.startswith(field)


def test_error_message_names_the_allowed_range():
    with pytest.raises(InvalidParameter, match=r"temperature: must be in \[0, 2\]"):
        SamplingParams(temperature=3)
    with pytest.raises(InvalidParameter, match=r"top_p: must be in \(0, 1\]"):
        SamplingParams(top_p=0)


def test_accepts_edges():
    params = SamplingParams(
        n=16, max_tokens=1_000_000, temperature=2, top_k=-1, top_p=1, min_p=1, repetition_penalty=10,
        presence_penalty=-2, frequency_penalty=2, seed=2**63 - 1, logprobs=20, stop=["a"] * 16,
        stop_token_ids=list(range(64)), logit_bias={0: -100, 1: 100},
    )
    assert params.temperature == 2.0 and isinstance(params.temperature, float)
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(max_tokens=0, prompt_logprobs=20).max_tokens == 0  # evaluate the prompt only


def test_min_tokens_cannot_exceed_max_tokens():
    assert SamplingParams(max_tokens=5, min_tokens=5).min_tokens == 5
    with pytest.raises(InvalidParameter, match="min_tokens"):
        SamplingParams(max_tokens=5, min_tokens=6)
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000


def test_stop_string_is_wrapped():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


def test_logit_bias_accepts_string_keys_as_openai_sends_them():
    params = SamplingParams(logit_bias={"50256": -100, 7: 2})
    assert params.logit_bias == {50256: -100.0, 7: 2.0}


def test_replace_revalidates_and_keeps_normalised_values():
    params = SamplingParams(stop="x", logit_bias={"3": 1}, seed=5)
    assert replace(params, seed=6).stop == ["x"]
    with pytest.raises(InvalidParameter, match="seed"):
        replace(params, seed=-1)


def test_keyword_only():
    with pytest.raises(TypeError):
        SamplingParams(2)


def test_check_vocab():
    SamplingParams(stop_token_ids=[99], logit_bias={99: 1}).check_vocab(100)
    with pytest.raises(InvalidParameter, match="stop_token_ids.*100"):
        SamplingParams(stop_token_ids=[100]).check_vocab(100)
    with pytest.raises(InvalidParameter) as error:
        SamplingParams(logit_bias={"150000": 5}).check_vocab(32000)
    assert error.value.field == "logit_bias"
