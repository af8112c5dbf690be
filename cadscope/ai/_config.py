"""The provider chain from the environment.

- ``CADSCOPE_AI_PROVIDERS``: comma-separated, in failover order (default ``local``);
  names: ``local``, ``openai_compatible``.
- ``CADSCOPE_AI_ENDPOINT`` (e.g. ``https://api.example.com/v1``), ``CADSCOPE_AI_MODEL``,
  ``CADSCOPE_AI_API_KEY`` or ``CADSCOPE_AI_API_KEY_FILE``, ``CADSCOPE_AI_TIMEOUT_S`` (30),
  ``CADSCOPE_AI_PRICE_IN_PER_1K`` / ``CADSCOPE_AI_PRICE_OUT_PER_1K`` (USD, for the cost counter).
- ``CADSCOPE_AI_BREAKER_FAILURES`` (3 in a row open the circuit), ``CADSCOPE_AI_BREAKER_RESET_S`` (30).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ._chain import ProviderChain
from ._providers import LocalProvider, OpenAICompatibleProvider, Provider

__all__ = ["chain_from_env"]


def chain_from_env(env: Mapping[str, str] | None = None) -> ProviderChain:
    env = os.environ if env is None else env
    providers: list[Provider] = []
    for name in (n.strip() for n in env.get("CADSCOPE_AI_PROVIDERS", "local").split(",") if n.strip()):
        if name == "local":
            providers.append(LocalProvider())
        elif name == "openai_compatible":
            endpoint, model = env.get("CADSCOPE_AI_ENDPOINT"), env.get("CADSCOPE_AI_MODEL")
            if not endpoint or not model:
                raise ValueError("openai_compatible needs CADSCOPE_AI_ENDPOINT and CADSCOPE_AI_MODEL")
            key = env.get("CADSCOPE_AI_API_KEY")
            if not key and env.get("CADSCOPE_AI_API_KEY_FILE"):
                key = Path(env["CADSCOPE_AI_API_KEY_FILE"]).read_text().strip()
            providers.append(
                OpenAICompatibleProvider(
                    endpoint,
                    model,
                    api_key=key or None,
                    timeout_s=float(env.get("CADSCOPE_AI_TIMEOUT_S", "30")),
                    price_in_per_1k=float(env.get("CADSCOPE_AI_PRICE_IN_PER_1K", "0")),
                    price_out_per_1k=float(env.get("CADSCOPE_AI_PRICE_OUT_PER_1K", "0")),
                )  # fmt: skip
            )
        else:
            raise ValueError(f"unknown AI provider {name!r} (known: local, openai_compatible)")
    return ProviderChain(
        providers,
        failure_threshold=int(env.get("CADSCOPE_AI_BREAKER_FAILURES", "3")),
        reset_after_s=float(env.get("CADSCOPE_AI_BREAKER_RESET_S", "30")),
    )
