"""AI providers: a prompt in, a job spec (data, never code) out.

Two implementations of one small interface:

- :class:`LocalProvider` needs no network. It reads a constrained English and
  turns it into a job spec, deterministically, or refuses with the reason.
- :class:`OpenAICompatibleProvider` calls ``POST {endpoint}/chat/completions``
  (JSON output requested) and returns the model's JSON, unexecuted; the chain
  validates it against :class:`~cadscope.freecad_bridge.JobSpec`.

Failures are typed by outcome (the ``outcome`` label of
``ai_provider_requests_total``): ``timeout``, ``rate_limited``,
``server_error``, ``unavailable``, ``invalid_output``, and ``refused`` (the
prompt, not the provider, is at fault: it never trips a circuit breaker).
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "LocalProvider",
    "OpenAICompatibleProvider",
    "PromptRefused",
    "Provider",
    "ProviderError",
    "ProviderResponse",
]


class ProviderError(Exception):
    """A provider call that produced no usable spec; ``outcome`` says why."""

    def __init__(self, outcome: str, message: str, *, rate_limit_remaining: float | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.rate_limit_remaining = rate_limit_remaining


class PromptRefused(ProviderError):
    def __init__(self, message: str) -> None:
        super().__init__("refused", message)


@dataclass
class ProviderResponse:
    spec: dict[str, Any]
    input_tokens: int = 0
    output_tokens: int = 0
    rate_limit_remaining: float | None = None  # 0-1, from the provider's headers
    attributes: dict[str, Any] = field(default_factory=dict)


class Provider(Protocol):
    name: str  # the metric label: "local" or "openai_compatible"
    model: str
    timeout_s: float
    price_in_per_1k: float
    price_out_per_1k: float

    def generate(self, prompt: str) -> ProviderResponse: ...


# -- the local provider ---------------------------------------------------------------------------

_NUM = r"(\d{1,4}(?:\.\d{1,3})?)"
_COUNTS = {"one": 1, "a": 1, "two": 2, "three": 3, "four": 4, "4": 4, "1": 1, "2": 2, "3": 3}
_MATERIALS = {
    "stainless steel": "stainless-304",
    "aluminium": "aluminium-6061",
    "aluminum": "aluminium-6061",
    "steel": "steel-s235",
    "brass": "brass-c360",
    "abs": "abs",
    "pla": "pla",
    "acrylic": "acrylic",
    "oak": "oak",
}
_FORMAT = r"(?:step|stl|brep|iges|obj)"
_PATTERNS = {
    "box": re.compile(rf"\b{_NUM}\s*(?:x|×|by)\s*{_NUM}\s*(?:x|×|by)\s*{_NUM}\s*mm\s+(plate|block|box|slab)\b"),
    "corner_holes": re.compile(rf"\b(\w+)\s+{_NUM}\s*mm\s+holes?\s+{_NUM}\s*mm\s+from\s+the\s+corners\b"),
    "centre_hole": re.compile(rf"\b(?:a|one)\s+{_NUM}\s*mm\s+hole\s+in\s+the\s+cent(?:re|er)\b"),
    "fillet": re.compile(rf"\b{_NUM}\s*mm\s+(?:fillets?|rounds?)\b"),
    "chamfer": re.compile(rf"\b{_NUM}\s*mm\s+chamfers?\b"),
    "material": re.compile(r"\b(?:in|made\s+of)\s+(" + "|".join(_MATERIALS) + r")\b"),
    "exports": re.compile(rf"\b(?:as|export(?:ed)?\s+(?:as|to))\s+({_FORMAT}(?:\s*(?:,|and|&)\s*{_FORMAT})*)\b"),
}
_FILLER = re.compile(r"\b(?:a|an|the|with|and|of|please|make|me|model|part)\b|[,.;:!]")


class LocalProvider:
    """Constrained English to a job spec, no network, same answer every time.

    Understands one plate/block (``L x W x H mm plate``), four holes ``D mm``
    wide ``O mm from the corners`` or one in the centre, vertical-edge fillets
    or chamfers (``R mm fillets``), a material from the library (``in
    aluminium``) and export formats (``as STEP and STL``). Any word it did not
    use is a refusal naming that word: it never guesses.
    """

    name = "local"
    model = "rules-v1"
    timeout_s = 1.0
    price_in_per_1k = 0.0
    price_out_per_1k = 0.0

    def generate(self, prompt: str) -> ProviderResponse:
        text = " ".join(prompt.lower().split())
        if len(text) > 2000:
            raise PromptRefused("prompt longer than 2000 characters")
        found: dict[str, re.Match[str]] = {}
        rest = text
        for key, pattern in _PATTERNS.items():
            match = pattern.search(rest)
            if match:
                found[key] = match
                rest = rest[: match.start()] + " " + rest[match.end() :]
        leftover = _FILLER.sub(" ", rest).split()
        if "box" not in found:
            raise PromptRefused("no part found: describe it as e.g. '60 x 40 x 8 mm plate'")
        if leftover:
            raise PromptRefused(f"could not understand: {' '.join(leftover[:10])!r}")
        return ProviderResponse(spec=_spec_from(found), input_tokens=len(text.split()))


def _spec_from(found: dict[str, re.Match[str]]) -> dict[str, Any]:
    length, width, height = (float(found["box"].group(i)) for i in (1, 2, 3))
    kind = found["box"].group(4)
    steps: list[dict[str, Any]] = [{"kind": "box", "name": "blank", "length": length, "width": width,
                                    "height": height}]  # fmt: skip
    holes: list[tuple[float, float, float]] = []
    if "corner_holes" in found:
        count_word, diameter, offset = found["corner_holes"].groups()
        if _COUNTS.get(count_word) != 4:
            raise PromptRefused(f"holes from the corners come in fours, not {count_word!r}")
        d, o = float(diameter), float(offset)
        if not (d / 2 < o and 2 * o < min(length, width)):
            raise PromptRefused(f"{d:g} mm holes {o:g} mm from the corners do not fit a {length:g} x {width:g} {kind}")
        holes += [(o, o, d), (length - o, o, d), (o, width - o, d), (length - o, width - o, d)]
    if "centre_hole" in found:
        d = float(found["centre_hole"].group(1))
        if d >= min(length, width):
            raise PromptRefused(f"a {d:g} mm hole does not fit a {length:g} x {width:g} {kind}")
        holes.append((length / 2, width / 2, d))
    target = "blank"
    if holes:
        names = [f"hole{i + 1}" for i in range(len(holes))]
        for name, (x, y, d) in zip(names, holes, strict=True):
            steps.append({"kind": "cylinder", "name": name, "radius": d / 2, "height": height,
                          "placement": {"position": [x, y, 0]}})  # fmt: skip
        steps.append({"kind": "boolean", "name": "drilled", "operation": "cut", "operands": ["blank", *names]})
        target = "drilled"
    if "fillet" in found:
        steps.append({"kind": "fillet", "name": "rounded", "target": target,
                      "radius": float(found["fillet"].group(1)), "edges": "vertical"})  # fmt: skip
    elif "chamfer" in found:
        steps.append({"kind": "chamfer", "name": "chamfered", "target": target,
                      "size": float(found["chamfer"].group(1)), "edges": "vertical"})  # fmt: skip
    part: dict[str, Any] = {"name": kind, "steps": steps}
    if "material" in found:
        part["material"] = _MATERIALS[found["material"].group(1)]
    formats = re.findall(_FORMAT, found["exports"].group(1)) if "exports" in found else ["step"]
    exports = [{"format": f, "of": kind, "name": kind} for f in dict.fromkeys(formats)]
    return {"name": f"prompt_{kind}", "flow_type": "ai_prompt", "parts": [part], "exports": exports}


# -- an OpenAI-compatible HTTP provider -----------------------------------------------------------

SYSTEM_PROMPT = (
    "You turn a description of a mechanical part into a cadscope job spec. Answer with one JSON object "
    "and nothing else, following this JSON schema:\n{schema}"
)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as an error, never followed: following it would send the
    request, its bearer key included, to wherever the answer points."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


def _ratio(headers: Any) -> float | None:
    """Rate-limit headroom from OpenAI-style headers: the scarcer of requests and tokens."""
    ratios = []
    for kind in ("requests", "tokens"):
        try:
            limit = float(headers.get(f"x-ratelimit-limit-{kind}", ""))
            remaining = float(headers.get(f"x-ratelimit-remaining-{kind}", ""))
        except ValueError:
            continue
        if limit > 0:
            ratios.append(max(0.0, min(1.0, remaining / limit)))
    return min(ratios) if ratios else None


class OpenAICompatibleProvider:
    """Chat completions over HTTP(S), JSON output. Configuration, never the
    request, chooses the endpoint and model; the API key never reaches a log,
    a span or a metric, nor any origin but the endpoint's (redirects are not
    followed)."""

    name = "openai_compatible"

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        price_in_per_1k: float = 0.0,
        price_out_per_1k: float = 0.0,
        max_response_bytes: int = 1 << 20,
    ) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError("the AI endpoint must be an http(s) URL")
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.price_in_per_1k = price_in_per_1k
        self.price_out_per_1k = price_out_per_1k
        self.max_response_bytes = max_response_bytes

    def __repr__(self) -> str:  # no key in reprs, tracebacks or logs
        return f"OpenAICompatibleProvider(url={self.url!r}, model={self.model!r})"

    def _schema(self) -> str:
        from ..freecad_bridge import JobSpec

        return json.dumps(JobSpec.model_json_schema(), separators=(",", ":"))

    def generate(self, prompt: str) -> ProviderResponse:
        body = {
            "model": self.model,
            "temperature": 0,
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT.format(schema=self._schema())},
                {"role": "user", "content": prompt},
            ],
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")  # noqa: S310
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                raw = response.read(self.max_response_bytes + 1)
                ratio = _ratio(response.headers)
        except urllib.error.HTTPError as exc:
            ratio = _ratio(exc.headers)
            if 300 <= exc.code < 400:
                raise ProviderError(
                    "unavailable",
                    f"HTTP {exc.code}: the endpoint redirects; point CADSCOPE_AI_ENDPOINT at its target",
                ) from None
            if exc.code == 429:
                raise ProviderError("rate_limited", "HTTP 429", rate_limit_remaining=ratio) from None
            outcome = "server_error" if exc.code >= 500 else "invalid_output"
            raise ProviderError(outcome, f"HTTP {exc.code}", rate_limit_remaining=ratio) from None
        except TimeoutError:
            raise ProviderError("timeout", f"no answer within {self.timeout_s:g} s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise ProviderError("timeout", f"no answer within {self.timeout_s:g} s") from None
            raise ProviderError("unavailable", f"cannot connect: {type(exc.reason).__name__}") from None
        except (ConnectionError, OSError) as exc:
            raise ProviderError("unavailable", f"connection failed: {type(exc).__name__}") from None
        if len(raw) > self.max_response_bytes:
            raise ProviderError("invalid_output", f"answer larger than {self.max_response_bytes} bytes")
        try:
            answer = json.loads(raw)
            content = answer["choices"][0]["message"]["content"]
            spec = json.loads(content) if isinstance(content, str) else content
            usage = answer.get("usage") or {}
            input_tokens, output_tokens = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        except (ValueError, KeyError, IndexError, TypeError):
            raise ProviderError("invalid_output", "the answer is not a chat completion with JSON content") from None
        if not isinstance(spec, dict):
            raise ProviderError("invalid_output", "the JSON content is not an object")
        return ProviderResponse(
            spec, input_tokens, output_tokens, ratio, {"gen_ai.response.model": answer.get("model")}
        )
