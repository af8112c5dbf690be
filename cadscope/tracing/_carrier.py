"""The environment-variable carrier of the OpenTelemetry spec.

``specification/context/env-carriers.md``: keys are ``TRACEPARENT``,
``TRACESTATE`` and ``BAGGAGE``; names are normalised to upper case with every
character that is not a letter, digit or underscore replaced by ``_``; each child
gets a fresh copy of the environment and the parent's own ``os.environ`` is
never written. opentelemetry-api's ``_envcarrier`` is private and changed its
signature in 1.44, so this small getter/setter is ours.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter

__all__ = ["EnvGetter", "EnvSetter", "extract_from_env", "inject_into_env", "normalise_key"]

_NOT_ALNUM = re.compile(r"[^A-Z0-9_]")


def normalise_key(key: str) -> str:
    """``traceparent`` -> ``TRACEPARENT``; ``x-foo`` -> ``X_FOO``."""
    return _NOT_ALNUM.sub("_", key.upper())


class EnvSetter(Setter[MutableMapping[str, str]]):
    def set(self, carrier: MutableMapping[str, str], key: str, value: str) -> None:
        carrier[normalise_key(key)] = value


class EnvGetter(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(normalise_key(key))
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


def inject_into_env(env: MutableMapping[str, str], context: Context | None = None) -> MutableMapping[str, str]:
    """Write the current (or given) context into ``env``, a child's fresh environment.

    Stale ``TRACEPARENT``/``TRACESTATE``/``BAGGAGE`` inherited from elsewhere are
    removed first so a child never continues someone else's trace.
    """
    if env is os.environ:
        raise ValueError("inject into a copy of the environment, never os.environ itself")
    for key in ("TRACEPARENT", "TRACESTATE", "BAGGAGE"):
        env.pop(key, None)
    propagate.inject(env, context=context, setter=EnvSetter())
    return env


def extract_from_env(env: Mapping[str, str] | None = None) -> Context:
    """The context a parent handed this process through its environment."""
    return propagate.extract(dict(os.environ) if env is None else env, getter=EnvGetter())
