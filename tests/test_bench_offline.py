"""`ember bench MODEL` on a tiny random model: every reported field present, consistent and sane.

Throughput figures are only checked for being positive and finite: benchmarks are commands, not
timed assertions.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from ember.bench.shapes import parameter_count
from ember.cli.main import main
from ember.config import config_from_hf, read_config_json
from tests.tiny_models import build_tiny_model, copy_tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, testdata):
    directory = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", directory)
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", directory)
    return directory


def bench(capsys, *argv: str) -> str:
    assert main(["bench", *argv]) == 0
    return capsys.readouterr().out


def test_json_record_is_complete_and_consistent(capsys, tiny_model):
    threads_before = torch.get_num_threads()
    record = json.loads(bench(capsys, str(tiny_model), "-p", "8,16", "-n", "4", "-c", "1,2", "-r", "2",
                              "-t", "1", "--output", "json"))
    assert torch.get_num_threads() == threads_before  # -t is undone afterwards

    assert record["ember_version"] and record["repetitions"] == 2 and record["warmup"] is True
    hw = record["hardware"]
    assert hw["cpu_model"] and hw["physical_cores"] >= 1 and hw["ram_bytes"] > 0
    assert isinstance(hw["cpu_features"], list) and isinstance(hw["gpus"], list)

    model = record["model"]
    config = config_from_hf(read_config_json(tiny_model), "llama")
    assert model["name"] == tiny_model.name and model["path"] == str(tiny_model)
    assert (model["format"], model["quant"], model["dtype"], model["device"]) == (
        "safetensors", "F32", "float32", "cpu")  # auto on CPU: float32 activations
    assert model["params"] == parameter_count(config)
    assert model["size_bytes"] == sum(f.stat().st_size for f in tiny_model.glob("*.safetensors"))

    results = record["results"]
    assert [(r["test"], r["concurrency"]) for r in results] == [
        ("pp8", 1), ("pp16", 1), ("tg4", 1), ("pp8", 2), ("pp16", 2), ("tg4", 2)]
    for r in results:
        assert r["threads"] == 1 and r["repetitions"] == 2 and r["preemptions"] == 0
        assert (r["n_prompt"], r["n_gen"]) == ((int(r["test"][2:]), 0) if r["test"].startswith("pp")
                                               else (0, int(r["test"][2:])))
        samples = r["tokens_per_s_samples"]
        assert len(samples) == 2 and all(s > 0 and math.isfinite(s) for s in samples)
        assert r["tokens_per_s_mean"] == pytest.approx(statistics.fmean(samples))
        assert r["tokens_per_s_sd"] == pytest.approx(statistics.stdev(samples))


def test_table_markdown_and_csv(capsys, tiny_model):
    table = bench(capsys, str(tiny_model), "-p", "8", "-n", "4", "-r", "1", "--no-warmup")
    assert "pp8" in table and "tg4" in table and "±" in table and tiny_model.name in table

    markdown = bench(capsys, str(tiny_model), "-p", "8", "-n", "0", "-r", "1", "--output", "md")
    header, rule, row, *_ = markdown.splitlines()
    assert header == "| model | size | params | quant | dtype | device | threads | test | c | t/s |"
    assert row.startswith(f"| {tiny_model.name} |") and "| pp8 |" in row and "tg" not in markdown.split("\n\n")[0]

    lines = bench(capsys, str(tiny_model), "-p", "0", "-n", "2", "-c", "1,3", "-r", "1", "--output", "csv").splitlines()
    columns = lines[0].split(",")
    assert len(lines) == 3 and {"cpu", "model_quant", "test", "concurrency", "tokens_per_s_mean"} <= set(columns)
    assert [line.split(",")[columns.index("concurrency")] for line in lines[1:]] == ["1", "3"]


def test_usage_errors(capsys, tiny_model):
    assert main(["bench", str(tiny_model), "-p", "0", "-n", "0"]) == 1
    assert "nothing to run" in capsys.readouterr().err
    assert main(["bench", str(tiny_model), "--url", "http://127.0.0.1:8080"]) == 1
    assert "ember bench serve" in capsys.readouterr().err
