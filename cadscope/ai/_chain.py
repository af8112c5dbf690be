"""A chain of providers with failover, a circuit breaker per provider, metrics and spans.

One ``ai.prompt_to_job`` span per prompt; under it one CLIENT span per provider
call (``ai.provider <name>``), ERROR with ``error.type`` when the call failed,
and a ``circuit_open`` event for a provider skipped by its breaker: the
failover reads top to bottom in the trace.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import ValidationError

from ..freecad_bridge import JobSpec
from ..metrics import ModelObservability, default_observability
from ._providers import Provider, ProviderError, ProviderResponse

__all__ = ["AllProvidersFailed", "Attempt", "ChainResult", "CircuitBreaker", "ProviderChain"]

OPERATION = "prompt_to_job"
STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    """closed → (``failure_threshold`` failures in a row) → open → (after
    ``reset_after_s``) → half_open: one trial call; success closes, failure
    opens again. Thread-safe; ``on_change(state)`` sees every transition."""

    def __init__(
        self,
        failure_threshold: int = 3,
        reset_after_s: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_running = False

    @property
    def state(self) -> str:
        with self._lock:
            return self._peek()

    def _peek(self) -> str:
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_after_s:
            return "half_open"
        return self._state

    def _set(self, state: str) -> None:
        if state != self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)

    def allow(self) -> bool:
        with self._lock:
            state = self._peek()
            if state == "closed":
                return True
            if state == "half_open" and not self._trial_running:
                self._set("half_open")
                self._trial_running = True
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._trial_running = False
            self._set("closed")

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == "half_open" or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
                self._trial_running = False
                self._set("open")

    def release(self) -> None:
        """A call that says nothing about the provider's health (a refused prompt)."""
        with self._lock:
            self._trial_running = False


@dataclass
class Attempt:
    provider: str
    outcome: str  # ok, a ProviderError outcome, or circuit_open
    seconds: float = 0.0
    message: str = ""


@dataclass
class ChainResult:
    spec: JobSpec
    provider: str
    model: str
    attempts: list[Attempt] = field(default_factory=list)


class AllProvidersFailed(Exception):
    def __init__(self, attempts: list[Attempt]) -> None:
        super().__init__("; ".join(f"{a.provider}: {a.outcome}" for a in attempts) or "no provider configured")
        self.attempts = attempts

    @property
    def refused(self) -> bool:
        """Every provider that answered refused the prompt: the prompt is at fault (422, not 503)."""
        answered = [a for a in self.attempts if a.outcome != "circuit_open"]
        return bool(answered) and all(a.outcome == "refused" for a in answered)


class ProviderChain:
    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        failure_threshold: int = 3,
        reset_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        observability: ModelObservability | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        if len({p.name for p in providers}) != len(providers):
            raise ValueError("one provider per name in a chain")
        self.providers = list(providers)
        self._obs = observability
        self._tracer = trace.get_tracer("cadscope.ai", tracer_provider=tracer_provider)
        self.breakers = {
            p.name: CircuitBreaker(failure_threshold, reset_after_s, clock=clock, on_change=self._watch(p.name))
            for p in providers
        }
        for provider in providers:
            self._state_changed(provider.name, "closed")

    @property
    def obs(self) -> ModelObservability:
        return self._obs or default_observability()

    def _watch(self, provider: str) -> Callable[[str], None]:
        return lambda state: self._state_changed(provider, state)

    def _state_changed(self, provider: str, state: str) -> None:
        self.obs.set_ai_circuit_state(provider, STATE_VALUES[state])

    def states(self) -> dict[str, str]:
        return {name: breaker.state for name, breaker in self.breakers.items()}

    def generate(self, prompt: str) -> ChainResult:
        attempts: list[Attempt] = []
        with self._tracer.start_as_current_span("ai.prompt_to_job") as chain_span:
            chain_span.set_attribute("cad.flow_type", "ai_prompt")
            for index, provider in enumerate(self.providers):
                breaker = self.breakers[provider.name]
                if not breaker.allow():
                    chain_span.add_event("circuit_open", {"ai.provider": provider.name})
                    attempts.append(Attempt(provider.name, "circuit_open"))
                    self._failover(provider, index)
                    continue
                result = self._call(provider, prompt, breaker, attempts)
                if result is not None:
                    chain_span.set_attribute("ai.provider", provider.name)
                    chain_span.set_attribute("ai.failovers", index)
                    return ChainResult(result, provider.name, provider.model, attempts)
                self._failover(provider, index)
            error = AllProvidersFailed(attempts)
            chain_span.set_status(Status(StatusCode.ERROR, "refused" if error.refused else "all providers failed"))
            chain_span.set_attribute("error.type", "refused" if error.refused else "providers_unavailable")
            raise error

    def _failover(self, provider: Provider, index: int) -> None:
        if index + 1 < len(self.providers):
            self.obs.record_ai_failover(provider.name)

    def _call(
        self, provider: Provider, prompt: str, breaker: CircuitBreaker, attempts: list[Attempt]
    ) -> JobSpec | None:
        attributes: dict[str, str | float] = {
            "gen_ai.system": provider.name,
            "gen_ai.request.model": provider.model,
            "gen_ai.operation.name": OPERATION,
            "server.timeout_s": provider.timeout_s,
        }
        with self._tracer.start_as_current_span(
            f"ai.provider {provider.name}", kind=SpanKind.CLIENT, attributes=attributes, record_exception=False,
            set_status_on_exception=False,
        ) as span:  # fmt: skip
            started = time.perf_counter()
            response: ProviderResponse | None = None
            try:
                response = provider.generate(prompt)
                spec = JobSpec.model_validate({**response.spec, "flow_type": "ai_prompt"})
                outcome, message = "ok", ""
            except ProviderError as exc:
                spec, outcome, message = None, exc.outcome, str(exc)
                if exc.rate_limit_remaining is not None:
                    self.obs.set_ai_rate_limit_remaining(provider.name, exc.rate_limit_remaining)
            except ValidationError as exc:
                first = exc.errors()[0]
                spec, outcome = None, "invalid_output"
                message = f"not a valid job spec: {'.'.join(map(str, first['loc']))}: {first['msg']}"
            except Exception as exc:  # noqa: BLE001 - a provider bug is that provider's failure, not the chain's
                spec, outcome, message = None, "server_error", f"provider raised {type(exc).__name__}"
            seconds = time.perf_counter() - started
            self._record(provider, outcome, seconds, response)
            span.set_attribute("cadscope.ai.outcome", outcome)
            if response is not None:
                span.set_attribute("gen_ai.usage.input_tokens", response.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", response.output_tokens)
            if outcome == "ok":
                breaker.record_success()
            else:
                span.set_status(Status(StatusCode.ERROR, message[:200]))
                span.set_attribute("error.type", outcome)
                if outcome == "refused":
                    breaker.release()
                else:
                    breaker.record_failure()
            attempts.append(Attempt(provider.name, outcome, seconds, message[:200]))
            return spec

    def _record(self, provider: Provider, outcome: str, seconds: float, response: ProviderResponse | None) -> None:
        obs = self.obs
        obs.record_ai_provider_latency(provider.name, provider.model, OPERATION, seconds)
        obs.record_ai_provider_request(provider.name, provider.model, outcome)
        if response is not None:
            cost = (response.input_tokens * provider.price_in_per_1k
                    + response.output_tokens * provider.price_out_per_1k) / 1000  # fmt: skip
            obs.record_ai_usage(provider.name, provider.model, response.input_tokens, response.output_tokens, cost)
            if response.rate_limit_remaining is not None:
                obs.set_ai_rate_limit_remaining(provider.name, response.rate_limit_remaining)

    def check(self, prompt: str = "a 10 x 10 x 2 mm plate") -> dict[str, dict[str, Any]]:
        """The synthetic check: the same tiny prompt through every
        provider on its own, breakers bypassed, metrics recorded."""
        report: dict[str, dict[str, Any]] = {}
        for provider in self.providers:
            attempts: list[Attempt] = []
            spec = self._call(provider, prompt, CircuitBreaker(failure_threshold=1_000_000), attempts)
            report[provider.name] = {"ok": spec is not None, "outcome": attempts[-1].outcome,
                                     "seconds": round(attempts[-1].seconds, 4)}  # fmt: skip
            self.obs.set_ai_synthetic(provider.name, spec is not None)
        return report
