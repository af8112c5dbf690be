"""The ai_prompt flow: a prompt becomes a job spec through a chain of providers.

::

    from cadscope.ai import ProviderChain, LocalProvider, chain_from_env

    chain = chain_from_env()                  # $CADSCOPE_AI_PROVIDERS, default "local"
    result = chain.generate("a 60 x 40 x 8 mm plate with four 5 mm holes 6 mm from the corners, as STEP")
    result.spec                               # a validated JobSpec, flow_type="ai_prompt"

A provider's output is data, validated against the job schema, never executed.
"""

from ._chain import AllProvidersFailed, Attempt, ChainResult, CircuitBreaker, ProviderChain
from ._config import chain_from_env
from ._providers import (
    LocalProvider,
    OpenAICompatibleProvider,
    PromptRefused,
    Provider,
    ProviderError,
    ProviderResponse,
)
from ._synthetic import SyntheticCheck

__all__ = [
    "AllProvidersFailed",
    "Attempt",
    "ChainResult",
    "CircuitBreaker",
    "LocalProvider",
    "OpenAICompatibleProvider",
    "PromptRefused",
    "Provider",
    "ProviderChain",
    "ProviderError",
    "ProviderResponse",
    "SyntheticCheck",
    "chain_from_env",
]
