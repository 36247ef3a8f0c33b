"""`ember serve --replicas`: ember on Ray Serve. The pure parts (routing keys, merged /metrics and /health, the
replica options) run everywhere; one `ember serve --replicas 2` of the bundled model on a local Ray instance
(loopback) serves the OpenAI and Ollama clients, routes shared prefixes to one replica and survives the death of
a replica mid-stream."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ember.cluster.aggregate import merge_health, merge_metrics
from ember.cluster.prefix import BLOCK_CHARS, prefix_hashes, prompt_text, routing_key
from tests.server_helpers import free_port

START_TIMEOUT_S = 240  # Ray, Serve and two model loads on two shared cores
SYSTEM = ("You are the assistant of a small hardware shop. Answer in one short sentence, politely, and never "
          "invent prices. ") * 12  # a long system prompt shared by every request of a "session"


# --- routing keys -------------------------------------------------------------------------------------------
def test_a_conversation_keeps_the_routing_key_of_its_earlier_turns():
    turn1 = {"model": "m", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]}
    turn2 = {"model": "m", "messages": [*turn1["messages"], {"role": "assistant", "content": "Hello! " * 40},
                                        {"role": "user", "content": "and then?"}]}
    first, second = routing_key(_json(turn1)), routing_key(_json(turn2))
    assert len(first) == len(prompt_text(turn1)) // BLOCK_CHARS > 5
    assert second[: len(first)] == first and len(second) > len(first)
    other_user = {**turn1, "messages": [turn1["messages"][0], {"role": "user", "content": "bye"}]}
    assert routing_key(_json(other_user))[: len(first) - 1] == first[:-1]  # the system prompt's blocks
    assert routing_key(_json({**turn1, "model": "other"}))[0] != first[0]  # another model, another cache
    assert prefix_hashes("x" * (BLOCK_CHARS - 1)) == ()  # no full block, nothing to match
    assert routing_key(b"not json") == () and routing_key(b"[1, 2]") == ()


def test_ollama_generate_keys_on_its_system_prompt_first():
    a = routing_key(_json({"model": "m", "system": SYSTEM, "prompt": "first question " * 20}))
    b = routing_key(_json({"model": "m", "system": SYSTEM, "prompt": "second one " * 30}))
    shared = len(SYSTEM) // BLOCK_CHARS
    assert a[:shared] == b[:shared] and a[shared:] != b[shared:]


def test_the_ingress_streams_what_the_client_may_get_as_a_stream():
    from ember.cluster.ingress import wants_stream

    assert wants_stream("/v1/chat/completions", {"stream": True})
    assert not wants_stream("/v1/chat/completions", {}) and not wants_stream("/completion", {"stream": False})
    assert wants_stream("/api/chat", {}) and wants_stream("/api/pull", {"name": "m"})  # Ollama streams by default
    assert not wants_stream("/api/generate", {"stream": False}) and not wants_stream("/v1/models", None)


def _json(body: dict) -> bytes:
    import json

    return json.dumps(body).encode()


# --- aggregation ----------------------------------------------------------------------------------------------
def test_metrics_of_all_replicas_merge_into_one_exposition_with_a_replica_label():
    from ember.server.metrics import Metrics
    from ember.server.pool import ModelPool

    texts = {}
    for name, seconds in (("r1", 0.1), ("r2", 0.3)):
        metrics = Metrics(ModelPool(max_memory=1))
        metrics.ttft.labels("m").observe(seconds)
        texts[name] = metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(merge_metrics(texts).decode())}
    ttft = families["ember_time_to_first_token_seconds"]
    sums = {s.labels["replica"]: s.value for s in ttft.samples if s.name.endswith("_sum")}
    assert sums == {"r1": pytest.approx(0.1), "r2": pytest.approx(0.3)}
    assert all(s.labels["model"] == "m" for s in ttft.samples)


def test_health_is_ready_while_any_replica_is():
    status, body = merge_health({"a": "ok", "b": "loading"}, unreachable=1)
    assert status == 200 and body["replicas"] == {"ready": 1, "total": 3}
    status, body = merge_health({"a": "loading"})
    assert status == 503 and body["status"] == "unavailable"


# --- the command ----------------------------------------------------------------------------------------------
def _serve_args(*extra: str) -> argparse.Namespace:
    from ember.cli.main import build_parser

    return build_parser().parse_args(["serve", *extra])


def test_replica_options_are_checked_and_threads_follow_the_replica_cpus():
    from ember.cluster.launch import plan_replicas
    from ember.errors import InvalidParameter

    plan = plan_replicas(_serve_args("--replicas", "3", "--replica-cpus", "2"))
    assert (plan.replicas, plan.threads, plan.most) == (3, 2, 3)
    assert plan.deployment_options(8)["num_replicas"] == 3
    plan = plan_replicas(_serve_args("--min-replicas", "1", "--max-replicas", "4", "--replica-cpus", "0.5"))
    assert plan.threads == 1
    autoscaling = plan.deployment_options(8)["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"], autoscaling["initial_replicas"]) == (1, 4, 1)
    assert plan_replicas(_serve_args("--replicas", "2", "-t", "3")).threads == 3
    for bad in (["--replicas", "0"], ["--min-replicas", "3", "--max-replicas", "2"],
                ["--replicas", "5", "--max-replicas", "4"], ["--replicas", "2", "--replica-cpus", "0"]):
        with pytest.raises(InvalidParameter):
            plan_replicas(_serve_args(*bad))


def test_replicas_without_ray_is_a_one_line_error(monkeypatch, capsys):
    from ember.cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    assert main(["serve", "--replicas", "2", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'ember[ray]'" in err


# --- two replicas on a local Ray instance -------------------------------------------------------------------------
class Cluster:
    def __init__(self, url: str, ray_address: str, process: subprocess.Popen, log: Path):
        self.url, self.ray_address, self.process, self.log = url, ray_address, process, log


@pytest.fixture(scope="module")
def cluster():
    # The test joins the cluster as a second driver (to kill a replica); a driver given an address uses the
    # token that `ray.init` made for the local instance (~/.ray/auth_token) only when told to.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # And it is on the single-machine instance's 127.0.0.1 only if Ray, imported next, runs in that mode too.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ember[ray]')")
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="ember-ray-")) / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ember.cli.main", "serve", "--replicas", "2", "--replica-cpus", "0.5", "-t", "1",
             "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "8", "--kv-memory", "32M"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = _wait_serving(process, log)
        yield Cluster(f"http://127.0.0.1:{port}", address, process, log)
    finally:
        code = _stop(process)
    assert code == 0, log.read_text()  # SIGTERM: the application and the Ray instance stopped cleanly


def _wait_serving(process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log.read_text()
        for line in text.splitlines():
            if line.startswith("ember serving") and " on Ray at " in line:
                address = line.rsplit(" on Ray at ", 1)[1].rstrip(")")
                assert address.startswith("127.0.0.1:")  # the local Ray instance is on loopback
                return address
        if process.poll() is not None:
            if "Ray" in text and "error: could not listen" not in text:
                pytest.skip(f"Ray could not start on this machine: {text.strip().splitlines()[-1]}")
            pytest.fail(f"ember serve --replicas exited with {process.returncode}: {text}")
        time.sleep(0.5)
    pytest.fail(f"ember serve --replicas was not serving within {START_TIMEOUT_S} s: {log.read_text()}")


def _stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: Ray's processes go with it
            process.wait()
            return -1
    return process.returncode


def test_openai_client_through_the_ingress(cluster):
    import openai

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", timeout=60, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="ember-default", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, temperature=0)
    reply = raw.parse()
    assert raw.headers["x-ember-replica"] and reply.usage.completion_tokens == 8
    assert float(raw.headers["server-timing"].removeprefix("ingress;dur=")) >= 0  # the ingress's own time, in ms
    stream = client.chat.completions.create(model="ember-default", messages=[{"role": "user", "content": "Say hello"}],
                                            max_tokens=8, temperature=0, stream=True)
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2  # streamed through, token by token, not one buffered body
    assert "".join(deltas) == reply.choices[0].message.content  # greedy: the same answer either way
    models = client.models.list()
    assert [m.id for m in models.data] == ["ember-default"]


def test_ollama_client_through_the_ingress(cluster):
    import ollama

    client = ollama.Client(host=cluster.url, timeout=60)
    parts = list(client.chat(model="ember-default", messages=[{"role": "user", "content": "Count to three"}],
                             stream=True, options={"num_predict": 6, "temperature": 0}))
    assert parts[-1].done and parts[-1].eval_count == 6
    assert sum(1 for p in parts if p.message.content) >= 2
    answer = client.generate(model="ember-default", prompt="Once upon a time", options={"num_predict": 4})
    assert answer.done and answer.eval_count == 4
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="no-such-model", prompt="x")
    assert err.value.status_code == 404  # the replica's own error, passed through


def test_health_and_metrics_are_aggregated_over_the_replicas(cluster):
    health = httpx.get(f"{cluster.url}/health", timeout=30)
    assert health.status_code == 200
    assert health.json()["replicas"] == {"ready": 2, "total": 2}
    text = httpx.get(f"{cluster.url}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    replicas = {s.labels["replica"] for s in families["ember_kv_blocks_total"].samples}
    assert replicas == set(health.json()["replica_status"]) and len(replicas) == 2


def test_a_body_over_the_size_limit_is_the_replicas_413(cluster):
    # The ingress reads a body up to just past --max-body (4 MiB) and forwards that much: over gRPC's default
    # message limit, which the ingress-replica transport raises, so the replica's guard answers (not a transport
    # error, 503), and the rest of the body is no sign that the client left (499).
    body = b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}'
    response = httpx.post(f"{cluster.url}/v1/completions", content=body, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "body_too_large" and response.headers["x-ember-replica"]


def _chat(url: str, system: str, question: str) -> httpx.Response:
    body = {"model": "ember-default", "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def _shared_tokens(url: str, system: str, questions: list[str]) -> int:
    """Tokens the prompts of the questions have in common (the template around the system prompt included)."""
    ids = []
    for question in questions[:2]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        prompt = httpx.post(f"{url}/apply-template", json={"messages": messages}, timeout=30).json()["prompt"]
        ids.append(httpx.post(f"{url}/tokenize", json={"content": prompt}, timeout=30).json()["tokens"])
    return next((i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b), min(map(len, ids)))


def test_requests_sharing_a_prefix_land_on_the_replica_that_has_it_cached(cluster):
    questions = [f"Question {i}: do you sell {item}?" for i, item in
                 enumerate(["nails", "screws", "glue", "tape", "rope", "paint"])]
    shared = _shared_tokens(cluster.url, SYSTEM, questions)
    assert shared > 200
    answers = [_chat(cluster.url, SYSTEM, q) for q in questions]
    replicas = {a.headers["x-ember-replica"] for a in answers}
    assert len(replicas) == 1  # random routing would send half of them to the replica without the prefix
    cached = [a.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers[1:]]
    assert min(cached) >= 0.9 * shared, (cached, shared)
    # Other prefixes are spread over both replicas (the one holding fewer prefixes takes a new one).
    others = [_chat(cluster.url, f"{i} " + SYSTEM[::-1], "hello").headers["x-ember-replica"] for i in range(4)]
    assert len(set(others) | replicas) == 2


def _engine_totals(url: str) -> tuple[float, float]:
    """(sequences the engines hold, running or waiting; tokens they generated), summed over the replicas."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text)}
    held = sum(s.value for name in ("ember_requests_running", "ember_requests_waiting")
               for s in families[name].samples)
    return held, sum(s.value for s in families["ember_generation_tokens"].samples)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_replica(cluster, stream):
    _, generated_before = _engine_totals(cluster.url)
    body = {"model": "ember-default", "max_tokens": 900, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": "Tell a long story"}]}
    if stream:  # leaves after a few chunks
        with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
    else:  # leaves before the answer (one whole-answer call to the replica, cancelled)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.25))
    deadline = time.monotonic() + 20
    while _engine_totals(cluster.url)[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    held, generated_after = _engine_totals(cluster.url)
    assert held == 0
    assert generated_after - generated_before < 900  # aborted when the client left, not run to its end


def test_a_replica_killed_mid_stream_fails_its_request_and_the_next_ones_succeed(cluster):
    import openai
    import ray

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", timeout=60, max_retries=0)
    ray.init(address=cluster.ray_address, logging_level="ERROR", log_to_driver=False)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="ember-default", messages=[{"role": "user", "content": "Tell a long story"}], max_tokens=900,
            stream=True, extra_body={"ignore_eos": True})
        replica = raw.headers["x-ember-replica"]
        chunks = iter(raw.parse())
        next(chunks)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::ember#EmberReplica#{replica}", namespace="serve"))
        began = time.monotonic()
        with pytest.raises(openai.APIError, match="replica"):
            for _ in chunks:
                pass
        assert time.monotonic() - began < 30  # an error, never a hang
    finally:
        ray.shutdown()
    for question in ("still there?", "and now?"):
        assert _chat(cluster.url, "Be brief.", question).status_code == 200


# --- the router's ranking (Ray's router base class, no cluster) ------------------------------------------------
def test_router_prefers_the_prefix_owner_until_its_queue_is_too_long():
    import asyncio
    from types import SimpleNamespace

    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ember[ray]')")
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest, ReplicaID

    from ember.cluster.forwarding import ForwardedRequest
    from ember.cluster.router import PrefixAwareRouter

    deployment = DeploymentID(name="EmberReplica", app_name="ember")
    router = PrefixAwareRouter(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(imbalance=2)
    a, b = (SimpleNamespace(replica_id=ReplicaID(name, deployment)) for name in ("a", "b"))

    def pending(*prefix: int) -> PendingRequest:
        request = ForwardedRequest("POST", "/v1/completions", b"", [], b"", prefix=prefix)
        return PendingRequest(args=[request], kwargs={}, metadata=RequestMetadata("id", "internal"))

    async def ranking(request: PendingRequest) -> list[str]:
        return [rank[0].replica_id.unique_id for rank in await router.choose_replicas([a, b], request)]

    async def scenario():
        router.on_request_routed(pending(1, 2, 3), b.replica_id, None)
        assert await ranking(pending(1, 2, 3, 4)) == ["b", "a"]  # b served the prefix
        assert await ranking(pending(7, 8)) == ["a", "b"]  # a new prefix goes to the replica holding fewer
        router.on_request_routed(pending(1, 2, 5), a.replica_id, None)
        assert await ranking(pending(1, 2, 5, 6)) == ["a", "b"]  # the longest prefix decides
        assert await ranking(pending(1, 2, 3)) == ["b", "a"]
        router.replica_queue_len_cache.update(a.replica_id, 3)  # a is 3 requests busier than b: beyond imbalance 2
        assert await ranking(pending(1, 2, 5, 6)) == ["b", "a"]
        router.replica_queue_len_cache.update(a.replica_id, 2)
        assert await ranking(pending(1, 2, 5, 6)) == ["a", "b"]
        router.on_replica_actor_died(a.replica_id)
        both = {a.replica_id: a, b.replica_id: b}
        assert router.owner((1, 2, 5), both) is None and router.owner((1, 2, 3), both) is b  # a's are forgotten

    asyncio.run(scenario())
