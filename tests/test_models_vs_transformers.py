"""Every family's logits and greedy tokens match transformers on the same random weights (fp32)."""

import pytest
import torch

from ember.loader.safetensors import load_safetensors_model
from tests.engine_helpers import greedy_tokens, prefill_logits
from tests.tiny_models import FAMILIES, build_tiny_model

PROMPT = [3, 17, 99, 250, 7, 64, 128, 5, 42, 200, 11, 301, 77, 8, 150, 33, 90, 12, 4, 260]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    import transformers

    directory = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                  attn_implementation="eager")
    model, config, _ = load_safetensors_model(directory, "float32", torch.device("cpu"))
    return request.param, reference, model, config


def test_logits_match_transformers(family_model):
    _, reference, model, config = family_model
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT])).logits[0]
    got = prefill_logits(model, config, PROMPT)
    assert (got - expected).abs().max().item() <= 1e-3


def test_greedy_tokens_match_transformers(family_model):
    family, reference, model, config = family_model
    steps = 32
    # transformers' own KV-cache decoding, without generate()'s EOS stop: ember's reference path has none.
    ids = torch.tensor([PROMPT])
    expected = []
    with torch.no_grad():
        step = reference(ids, use_cache=True)
        for _ in range(steps):
            token = int(step.logits[0, -1].argmax())
            expected.append(token)
            step = reference(torch.tensor([[token]]), past_key_values=step.past_key_values, use_cache=True)

    assert greedy_tokens(model, config, PROMPT, steps) == expected, family
