"""The ai_prompt flow: local provider, OpenAI-compatible provider, failover, breakers.

The hosted AI service cannot be reached from here: :class:`ChatServer` stands
in for it. It is a real HTTP server on loopback speaking the chat-completions
protocol (``POST /v1/chat/completions``, JSON in and out, OpenAI's rate-limit
headers), told per test to answer well, slowly, with 429, with 500, with
invalid JSON, or with JSON that is not a job spec.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from cadscope.ai import (
    AllProvidersFailed,
    CircuitBreaker,
    LocalProvider,
    OpenAICompatibleProvider,
    PromptRefused,
    ProviderChain,
    chain_from_env,
)
from cadscope.freecad_bridge import JobSpec
from cadscope.metrics import Catalogue, ModelObservability
from cadscope.tracing.testing import in_memory_provider

EXAMPLE = ("a 60 x 40 x 8 mm plate with four 5 mm holes 6 mm from the corners and 1 mm fillets, "
           "in aluminium, as STEP and STL")  # fmt: skip
SPEC = {
    "name": "from_the_model",
    "parts": [{"name": "p", "steps": [{"kind": "box", "name": "b", "length": 10, "width": 10, "height": 2}]}],
    "exports": [{"format": "step", "of": "p", "name": "p"}],
}


class ChatServer:
    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        # "slow" holds its answer until the test is over: the client can only have
        # returned by timing out, however loaded the machine is.
        self.release = threading.Event()
        self.holding = threading.Event()
        self.redirect_to = ""
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - what a followed 302 turns a POST into
                server.requests.append({"path": self.path, "auth": self.headers.get("authorization"), "body": None})
                self._send(200, b"{}")

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("authorization"), "body": body})
                mode = server.mode
                if mode == "redirect":  # to another origin (another port), as a hijacked endpoint might
                    self.send_response(302)
                    self.send_header("Location", server.redirect_to)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if mode == "slow":
                    server.holding.set()
                    server.release.wait(60)
                if mode == "429":
                    self._send(429, b'{"error": "rate limited"}', {"x-ratelimit-limit-requests": "100",
                                                                   "x-ratelimit-remaining-requests": "0",
                                                                   "retry-after": "20"})  # fmt: skip
                elif mode == "500":
                    self._send(500, b'{"error": "overloaded"}')
                elif mode == "garbage":
                    self._send(200, b"<html>not json</html>")
                else:
                    content = {"not": "a job"} if mode == "not_a_spec" else SPEC
                    answer = {"model": body["model"], "choices": [{"message": {"content": json.dumps(content)}}],
                              "usage": {"prompt_tokens": 1200, "completion_tokens": 300}}  # fmt: skip
                    self._send(200, json.dumps(answer).encode(), {"x-ratelimit-limit-requests": "100",
                                                                  "x-ratelimit-remaining-requests": "25",
                                                                  "x-ratelimit-limit-tokens": "10000",
                                                                  "x-ratelimit-remaining-tokens": "9000"})  # fmt: skip

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out first

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def chat():
    server = ChatServer()
    yield server
    server.release.set()
    server.httpd.shutdown()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _chain(chat: ChatServer, *, clock=None, threshold: int = 3, local: bool = True):  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    obs = ModelObservability(Catalogue(registry))
    tracer_provider, exporter = in_memory_provider()
    http = OpenAICompatibleProvider(chat.endpoint, "cad-model-1", api_key="sk-secret-canary", timeout_s=2,
                                    price_in_per_1k=0.01, price_out_per_1k=0.03)  # fmt: skip
    providers = [http, LocalProvider()] if local else [http]
    chain = ProviderChain(providers, failure_threshold=threshold, reset_after_s=30, clock=clock or time.monotonic,
                          observability=obs, tracer_provider=tracer_provider)  # fmt: skip
    return chain, registry, exporter


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- the local provider ---------------------------------------------------------------------------


def test_local_provider_turns_the_example_into_a_valid_spec_the_same_way_every_time():
    first = LocalProvider().generate(EXAMPLE).spec
    assert first == LocalProvider().generate(EXAMPLE.upper()).spec  # deterministic, case-blind
    spec = JobSpec.model_validate(first)
    assert spec.flow_type == "ai_prompt"
    part = spec.parts[0]
    assert part.material == "aluminium-6061"
    holes = [s for s in part.steps if s.kind == "cylinder"]
    assert sorted(tuple(h.placement.position[:2]) for h in holes) == [(6, 6), (6, 34), (54, 6), (54, 34)]
    assert {h.radius for h in holes} == {2.5}
    fillet = next(s for s in part.steps if s.kind == "fillet")
    assert fillet.radius == 1 and fillet.target == "drilled"
    assert [e.format for e in spec.exports] == ["step", "stl"]


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("a teapot", "no part found"),
        ("a 60 x 40 x 8 mm plate with a spout", "could not understand: 'spout'"),
        ("a 60 x 40 x 8 mm plate with three 5 mm holes 6 mm from the corners", "come in fours"),
        ("a 20 x 20 x 5 mm plate with four 8 mm holes 3 mm from the corners", "do not fit"),
        ("a 60 x 40 x 8 mm plate; import os; os.system('rm -rf /')", "could not understand"),
    ],
)
def test_local_provider_refuses_what_it_cannot_parse_and_says_why(prompt, reason):
    with pytest.raises(PromptRefused) as refused:
        LocalProvider().generate(prompt)
    assert reason in str(refused.value)
    assert refused.value.outcome == "refused"


# -- the HTTP provider and the chain ----------------------------------------------------------------


def test_http_provider_answer_is_validated_and_its_usage_cost_and_headroom_recorded(chat):
    chain, registry, exporter = _chain(chat)
    result = chain.generate("a small plate")
    assert result.provider == "openai_compatible" and result.spec.name == "from_the_model"
    assert result.spec.flow_type == "ai_prompt"  # whatever the model said, the flow is ours to set
    sent = chat.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-secret-canary"
    assert sent["body"]["response_format"] == {"type": "json_object"} and sent["body"]["model"] == "cad-model-1"
    labels = {"provider": "openai_compatible", "model": "cad-model-1"}
    assert _value(registry, "ai_provider_requests_total", **labels, outcome="ok") == 1
    assert _value(registry, "ai_provider_tokens_total", **labels, kind="input") == 1200
    assert _value(registry, "ai_provider_tokens_total", **labels, kind="output") == 300
    assert _value(registry, "ai_provider_cost_usd_total", **labels) == pytest.approx(1.2 * 0.01 + 0.3 * 0.03)
    # The scarcer of requests (25/100) and tokens (9000/10000).
    assert _value(registry, "ai_provider_rate_limit_remaining_ratio", provider="openai_compatible") == 0.25
    assert _value(registry, "ai_provider_latency_seconds_count", **labels, operation="prompt_to_job") == 1
    spans = exporter.get_finished_spans()
    assert "sk-secret-canary" not in json.dumps([dict(s.attributes or {}) for s in spans])
    assert "sk-secret-canary" not in repr(chain.providers[0])


@pytest.mark.parametrize(
    ("mode", "outcome"),
    [("slow", "timeout"), ("429", "rate_limited"), ("500", "server_error"), ("garbage", "invalid_output"),
     ("not_a_spec", "invalid_output")],
)  # fmt: skip
def test_failover_to_the_next_provider_is_counted_and_visible_in_the_trace(chat, mode, outcome):
    chat.mode = mode
    chain, registry, exporter = _chain(chat)
    result = chain.generate(EXAMPLE)
    if mode == "slow":  # cut off at its timeout: the server had the request and never answered
        assert chat.holding.is_set() and not chat.release.is_set()
    assert result.provider == "local"
    assert [(a.provider, a.outcome) for a in result.attempts] == [("openai_compatible", outcome), ("local", "ok")]
    assert _value(registry, "ai_provider_requests_total", provider="openai_compatible", model="cad-model-1",
                  outcome=outcome) == 1  # fmt: skip
    assert _value(registry, "ai_provider_failovers_total", provider="openai_compatible") == 1
    if mode == "429":
        assert _value(registry, "ai_provider_rate_limit_remaining_ratio", provider="openai_compatible") == 0
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root, failed, used = spans["ai.prompt_to_job"], spans["ai.provider openai_compatible"], spans["ai.provider local"]
    assert failed.parent.span_id == root.context.span_id and used.parent.span_id == root.context.span_id
    assert failed.status.status_code.name == "ERROR" and failed.attributes["error.type"] == outcome
    assert used.status.status_code.name != "ERROR" and root.attributes["ai.provider"] == "local"
    assert failed.end_time <= used.start_time  # one after the other, as the trace shows


def test_the_breaker_opens_skips_the_provider_and_recovers_through_half_open(chat):
    clock = Clock()
    chat.mode = "500"
    chain, registry, exporter = _chain(chat, clock=clock, threshold=2)
    state = lambda: _value(registry, "ai_provider_circuit_state", provider="openai_compatible")  # noqa: E731
    assert state() == 0
    for _ in range(2):
        chain.generate(EXAMPLE)
    assert chain.states()["openai_compatible"] == "open" and state() == 2
    calls = len(chat.requests)
    result = chain.generate(EXAMPLE)  # skipped without a request
    assert len(chat.requests) == calls
    assert [(a.provider, a.outcome) for a in result.attempts] == [("openai_compatible", "circuit_open"),
                                                                   ("local", "ok")]  # fmt: skip
    root = [s for s in exporter.get_finished_spans() if s.name == "ai.prompt_to_job"][-1]
    assert [e.name for e in root.events] == ["circuit_open"]

    clock.now += 31  # past the reset time: one trial call; it fails and the circuit opens again
    assert chain.states()["openai_compatible"] == "half_open"
    chain.generate(EXAMPLE)
    assert len(chat.requests) == calls + 1 and state() == 2
    chain.generate(EXAMPLE)
    assert len(chat.requests) == calls + 1  # open again: no request

    clock.now += 31
    chat.mode = "ok"
    assert chain.generate("anything").provider == "openai_compatible"
    assert chain.states()["openai_compatible"] == "closed" and state() == 0


def test_a_refusal_is_the_prompts_fault_and_never_opens_a_breaker():
    breaker = CircuitBreaker(failure_threshold=1)
    chain = ProviderChain([LocalProvider()], observability=ModelObservability(Catalogue(CollectorRegistry())))
    chain.breakers["local"] = breaker
    for _ in range(3):
        with pytest.raises(AllProvidersFailed) as failed:
            chain.generate("a teapot")
        assert failed.value.refused
    assert breaker.state == "closed"


def test_all_providers_down_is_not_a_refusal(chat):
    chat.mode = "500"
    chain, _, _ = _chain(chat, local=False)
    with pytest.raises(AllProvidersFailed) as failed:
        chain.generate(EXAMPLE)
    assert not failed.value.refused and failed.value.attempts[0].outcome == "server_error"


def test_a_redirect_never_takes_the_key_to_another_origin():
    """The endpoint answers 302 to another origin: the request is not followed there, so the
    other origin never sees the bearer key (nor the prompt); the provider is unavailable."""
    endpoint, elsewhere = ChatServer(), ChatServer()
    try:
        endpoint.mode, endpoint.redirect_to = "redirect", f"{elsewhere.endpoint}/chat/completions"
        provider = OpenAICompatibleProvider(endpoint.endpoint, "m", api_key="sk-secret-canary", timeout_s=2)
        chain = ProviderChain([provider], observability=ModelObservability(Catalogue(CollectorRegistry())))
        with pytest.raises(AllProvidersFailed) as failed:
            chain.generate(EXAMPLE)
        assert failed.value.attempts[0].outcome == "unavailable"
        assert "redirect" in failed.value.attempts[0].message
        assert [r["auth"] for r in endpoint.requests] == ["Bearer sk-secret-canary"]
        assert elsewhere.requests == []
    finally:
        endpoint.httpd.shutdown()
        elsewhere.httpd.shutdown()


def test_connection_refused_is_unavailable():
    provider = OpenAICompatibleProvider("http://127.0.0.1:9/v1", "m", timeout_s=0.5)
    chain = ProviderChain([provider], observability=ModelObservability(Catalogue(CollectorRegistry())))
    with pytest.raises(AllProvidersFailed) as failed:
        chain.generate(EXAMPLE)
    assert failed.value.attempts[0].outcome == "unavailable"


def test_synthetic_check_runs_every_provider_and_sets_its_gauge(chat):
    chat.mode = "500"
    chain, registry, _ = _chain(chat)
    report = chain.check()
    assert report["openai_compatible"]["outcome"] == "server_error" and report["local"]["ok"]
    assert _value(registry, "ai_provider_synthetic_ok", provider="openai_compatible") == 0
    assert _value(registry, "ai_provider_synthetic_ok", provider="local") == 1
    assert chain.states()["openai_compatible"] == "closed"  # synthetic checks leave the breakers alone


def test_chain_from_env_names_what_is_missing():
    assert [p.name for p in chain_from_env({}).providers] == ["local"]
    with pytest.raises(ValueError, match="CADSCOPE_AI_ENDPOINT"):
        chain_from_env({"CADSCOPE_AI_PROVIDERS": "openai_compatible,local"})
    with pytest.raises(ValueError, match="unknown AI provider"):
        chain_from_env({"CADSCOPE_AI_PROVIDERS": "gpt"})


# -- through the API, to a real worker ------------------------------------------------------------


@pytest.mark.slow
def test_a_prompt_through_the_api_becomes_a_job_that_runs(chat, start_worker, start_api, engines):
    chat.mode = "500"  # the first provider is down: the local one takes over, and the job runs
    worker = start_worker()
    api = start_api(worker, env={"CADSCOPE_AI_PROVIDERS": "openai_compatible,local",
                                 "CADSCOPE_AI_ENDPOINT": chat.endpoint, "CADSCOPE_AI_MODEL": "cad-model-1",
                                 "CADSCOPE_AI_TIMEOUT_S": "2"})  # fmt: skip
    response = httpx.post(f"{api.url}/v1/prompts", json={"prompt": EXAMPLE, "engine": "freecad"},
                          headers=api.headers(), timeout=30)  # fmt: skip
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["provider"] == "local" and body["failovers"] == 1 and "traceparent" in response.headers

    def done():  # type: ignore[no-untyped-def]
        status = httpx.get(f"{api.url}/v1/jobs/{body['job_id']}", headers=api.headers(), timeout=10).json()
        return status if status.get("state") == "finished" else None

    from .conftest import wait_until

    status = wait_until(done, 120, interval=0.2, what="prompt job finished")
    assert status["status"] == "succeeded", status
    assert {a["name"] for a in status["artifacts"]} == {"plate.step", "plate.stl"}
    assert 'flow_type="ai_prompt"' in worker.scrape()

    # The local provider refuses; the other one, which might have understood, is down: retry later (503),
    # and the answer says what each provider did.
    refused = httpx.post(f"{api.url}/v1/prompts", json={"prompt": "a teapot"}, headers=api.headers(), timeout=30)
    assert refused.status_code == 503 and refused.headers["retry-after"]
    attempts = refused.json()["detail"]["attempts"]
    assert [a["outcome"] for a in attempts] == ["server_error", "refused"] and "no part" in attempts[1]["detail"]
    bad = httpx.post(f"{api.url}/v1/prompts", json={"prompt": ""}, headers=api.headers(), timeout=30)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "prompt"]
    ready = httpx.get(f"{api.url}/health/ready", timeout=10).json()
    assert set(ready["ai_providers"]) == {"openai_compatible", "local"}
    detailed = httpx.get(f"{api.url}/health/detailed", headers=api.headers(), timeout=10).json()
    assert {p["provider"]: p["circuit"] for p in detailed["ai_providers"]}["local"] == "closed"
    metrics = httpx.get(f"{api.url}/metrics", timeout=10).text
    assert 'ai_provider_failovers_total{provider="openai_compatible"}' in metrics
