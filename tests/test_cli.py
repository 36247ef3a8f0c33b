"""`ember` as a user runs it: one-shot and piped chat, and one-line errors without tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tests.tiny_models import build_tiny_model, copy_tokenizer


def ember(*args: str, stdin: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, testdata) -> Path:
    directory = build_tiny_model("llama", tmp_path_factory.mktemp("cli-llama"))
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", directory)
    return directory


def test_one_shot_prompt_streams_text(testdata):
    result = ember("run", str(testdata / "gguf" / "tiny-llama-hf"), "Once upon a time", "--max-tokens", "8",
                   "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_greedy_one_shot_matches_python_api(testdata):
    from ember import LLM, SamplingParams

    model = str(testdata / "gguf" / "tiny-llama-hf")
    expected = LLM(model).generate("Hello", SamplingParams(temperature=0, max_tokens=6))[0].text
    result = ember("run", model, "Hello", "--raw", "--max-tokens", "6", "--temperature", "0", "--repeat-penalty", "1")
    assert result.stdout == expected + "\n"


def test_piped_chat_lines(testdata):
    model = str(testdata / "gguf" / "tiny-llama-hf")
    result = ember("run", model, "--raw", "--max-tokens", "4", stdin="hello\nworld\n/bye\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) >= 1


@pytest.mark.parametrize("args, message", [
    (["run", "/no/such/model", "hi"], "not found"),
    (["run", "--temperature", "9", "/no/such/model", "hi"], "temperature"),
    # checked before the model is looked for (or, for serve, the server started)
    (["run", "-t", "0", "/no/such/model", "hi"], "threads: must be a positive integer"),
    (["serve", "--threads", "-1", "/no/such/model"], "threads: must be a positive integer"),
    (["bench", "/no/such/model", "-t", "2,0"], "--threads values must be positive"),
    (["tokenize", "/no/such.gguf", "hi"], "not a model folder"),
])
def test_errors_are_one_line(args, message):
    result = ember(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bad_checkpoint_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = ember("run", str(tmp_path), "hi")
    assert result.returncode == 1 and "not readable JSON" in result.stderr
    (tmp_path / "config.json").write_text('{"architectures": ["MambaForCausalLM"], "model_type": "mamba"}')
    result = ember("run", str(tmp_path), "hi")
    assert "unsupported architecture MambaForCausalLM" in result.stderr and "LlamaForCausalLM" in result.stderr


def test_corrupt_and_mismatched_weights(tiny_chat_model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_chat_model, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    result = ember("run", str(broken), "hi")
    assert result.returncode == 1 and "safetensors" in result.stderr and "Traceback" not in result.stderr
    shutil.copy(tiny_chat_model / "model.safetensors", broken / "model.safetensors")
    config = (broken / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 96')
    (broken / "config.json").write_text(config)
    result = ember("run", str(broken), "hi")
    assert result.returncode == 1 and "shape" in result.stderr


@pytest.mark.parametrize("name", ["tiny-llama-Q4_K_M.gguf", "tiny-llama-bf16.gguf"])
def test_run_gguf_matches_python_api(testdata, name):
    """With the default dtype (bf16 on CPU): quantized matrices, and float ones read straight from the map."""
    from ember import LLM, SamplingParams

    model = testdata / "gguf" / name
    result = ember("run", str(model), "--raw", "The sky is", "--max-tokens", "6", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    expected = LLM(str(model)).generate("The sky is", SamplingParams(temperature=0, max_tokens=6))[0].text
    assert result.stdout.rstrip("\n") == expected


def test_tokenize_vocabulary_only_gguf(testdata):
    result = ember("tokenize", str(testdata / "vocab" / "ggml-vocab-qwen2.gguf"), "Hello world", "--ids")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[9707, 1879]"


def test_hostile_gguf_is_one_line_error(testdata, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((testdata / "gguf" / "tiny-llama-Q4_0.gguf").read_bytes()[:100])
    result = ember("run", str(truncated), "hi")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot fit in a file of 100 bytes" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_run_format_constrains_the_reply(tmp_path):
    """`ember run --format SCHEMA` answers JSON that validates (a schema file here); a bad schema is one line."""
    schema = {"type": "object", "properties": {"animal": {"enum": ["cat", "dog"]},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
              "required": ["animal", "legs"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    result = ember("run", "ember-default", "--format", str(path), "--temperature", "1", "--seed", "4",
                   "--max-tokens", "40", "Name an animal.")
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), schema)
    bad = ember("run", "ember-default", "--format", '{"type": "foo"}', "hi")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        'error: --format: invalid json schema: Unsupported type "foo"']
