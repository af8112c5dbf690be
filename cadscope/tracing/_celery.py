"""The consumer side of Celery tracing, lean: one CONSUMER span per task run.

opentelemetry-instrumentation-celery stays on the publishing side (the API and
the CLI): its PRODUCER span ``apply_async/<task>`` injects ``traceparent`` into
the message headers. In the worker, its ``task_prerun``/``task_postrun``
handlers cost about twice what this module does per task (bench/RESULTS.md,
"Task overhead"), mostly in attributes that every span then carries through
export: the ``repr()`` of ``delivery_info``, ``reply_to``, ``timelimit``,
``hostname`` (already on the resource as ``host.name``), a conversation id
equal to the message id, plus a no-op duration histogram we never export.

This module keeps what a trace reader uses, under the same names, so queries
written against upstream keep working:

- span ``run/<task name>``, kind CONSUMER, child of the publisher's span
  (a parent, not a link: one trace from the request to the deepest OCCT span);
- ``celery.action="run"``, ``celery.task_name``, ``messaging.message.id``,
  ``messaging.destination`` (the routing key), ``celery.retries`` when > 0,
  ``celery.state`` at the end;
- ERROR status and an exception event on failure (unless the task declares the
  exception in ``throws``), ``celery.retry.reason`` on retry.

Header values that are not strings are ignored rather than coerced, so a
hostile message cannot feed lists or numbers into the W3C propagator; invalid
``traceparent`` values start a new trace, as the W3C spec says.

The span is a :class:`~cadscope.tracing._lean.LeanSpan`: the same exported
span as the SDK's for the same calls, at about half the cost. Where nothing
would be lost, it is deferred (:func:`~cadscope.tracing._lean.start_deferred_span`):
the task thread keeps the message's ``traceparent``/``tracestate`` and the
span gets its ids and sampling decision when first asked for: by the task
(a child span, a log line) or else on the span processor's export thread.
That is when the propagator is W3C's, the message carries no baggage, its
``traceparent`` (if any) has version 00's form with the sampled flag set, and
the tracer is the SDK's with one of its own samplers. A message whose
``traceparent`` is valid but unsampled (head sampling at the API) is deferred
too where the sampler drops every child of such a parent (``ParentBased``'s
default): its span records nothing, never reaches the span queue, and makes
its ids only if the task asks (a child process to propagate to). Every other
message takes the eager path.

Two ways in, one span. Celery's per-task signals (``task_prerun``,
``task_postrun``, ``task_failure``, ``task_retry``) see every task whatever
its class. Or the task's own hooks, when every task of the app is a
:class:`TracedTask` (cadscope's worker app): then no receiver is connected to
the per-task signals, and Celery skips sending them: on a busy host that
saved 17-34 µs a task on the pool's task thread (bench/RESULTS.md, "Task
hooks instead of signals"). :class:`TracedTask` says where its span
starts and ends against the signal path's.

If opentelemetry-instrumentation-celery is also instrumented in the process
(``opentelemetry-instrument celery worker``, say), its consumer handlers are
disconnected while ours are connected, so a task run gets one span, not two
nested ones; its publisher handlers stay.
"""

from __future__ import annotations

import functools
import logging
import sys
from contextvars import ContextVar
from typing import Any

from celery import Task, signals
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.threads import get_ident  # a greenlet where Celery's request stacks key on one
from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._lean import (
    _ODD_HEX,
    accepts_traceparent,
    drops_unsampled_remote,
    sdk_sampler,
    start_deferred_span,
    start_lean_span,
)

__all__ = ["TracedTask", "instrument_celery_worker", "uninstrument_celery_worker"]

log = logging.getLogger(__name__)


class _RequestGetter(Getter[Any]):
    """Reads propagation headers off a Celery request (headers become attributes)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        value = getattr(carrier, key, None)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Any) -> list[str]:
        return []


_GETTER = _RequestGetter()
_W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})


def _deferrable(request: Any, w3c: bool, drops_unsampled: bool) -> tuple[dict[str, str], bool] | None:
    """The message's span context headers, and whether its span may record,
    if the span may be deferred: the propagator is W3C's (trace context and
    baggage, or either), the message carries no baggage (which must be in the
    task's context from the start), and its ``traceparent``, if any, has
    version 00's form (55 characters) and

    - the sampled flag: the span may record, decided when first asked for;
    - or the flag cleared, where the sampler drops every child of an
      unsampled remote parent (``drops_unsampled``) and the header is one
      the W3C propagator accepts: the span records nothing, is never queued,
      and makes its ids only if asked for them. A header it would refuse
      starts a new trace, which the sampler may record: the eager path.
    """
    if not w3c or isinstance(getattr(request, "baggage", None), str):
        return None
    traceparent = getattr(request, "traceparent", None)
    if not isinstance(traceparent, str):
        return {}, True
    if len(traceparent) != 55:
        return None
    sampled = traceparent[-1] in _ODD_HEX
    if not sampled and not (drops_unsampled and accepts_traceparent(traceparent)):
        return None
    tracestate = getattr(request, "tracestate", None)
    if isinstance(tracestate, str):
        return {"traceparent": traceparent, "tracestate": tracestate}, sampled
    return {"traceparent": traceparent}, sampled


def _current_context_variable() -> tuple[ContextVar[Context], str] | None:
    """The ContextVar that holds OpenTelemetry's current context and the key of the current span in
    it, where the runtime context is the API's default (contextvars) and sets a span as the API
    does; None otherwise (``OTEL_PYTHON_CONTEXT`` names another, or the API's internals moved).

    ``context.attach(trace.set_span_in_context(span))`` and ``context.detach`` run 8 Python calls
    across three modules of the API to set and reset this variable; a busy host charges each one
    its code and data read from memory again (bench/RESULTS.md, "The task's context, set
    directly"). With the variable, a task's span is made current, and the context restored, by
    the same ``ContextVar.set`` and ``reset`` and the same ``Context``, in two calls."""
    runtime = getattr(context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    key = getattr(getattr(trace, "propagation", None), "_SPAN_KEY", None)
    if type(runtime) is not ContextVarsRuntimeContext or type(variable) is not ContextVar or type(key) is not str:
        return None
    empty = Context()
    try:  # the API sets the span under that key, in a Context of that variable's type
        token = variable.set(empty)
        try:
            made = trace.set_span_in_context(trace.INVALID_SPAN)
            direct = type(variable.get()) is Context and made == Context({key: trace.INVALID_SPAN})
        finally:
            variable.reset(token)
    except Exception:  # noqa: BLE001 - any surprise: the API's calls, as before
        return None
    return (variable, key) if direct else None


def _upstream_consumer_handlers() -> list[tuple[Any, Any]]:
    """opentelemetry-instrumentation-celery's task-run handlers, if it is instrumented here."""
    try:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
    except ImportError:
        return []
    upstream = CeleryInstrumentor()  # a singleton
    if not upstream.is_instrumented_by_opentelemetry:
        return []
    names = (("task_prerun", "_trace_prerun"), ("task_postrun", "_trace_postrun"),
             ("task_failure", "_trace_failure"), ("task_retry", "_trace_retry"))  # fmt: skip
    return [
        (getattr(signals, signal), getattr(upstream, method)) for signal, method in names if hasattr(upstream, method)
    ]


class _WorkerTracing:
    def __init__(self, tracer_provider: trace.TracerProvider | None, hooks: bool = False) -> None:
        self._tracer = trace.get_tracer("cadscope.celery", tracer_provider=tracer_provider)
        # What deferring_tracer() asks of the tracer: the SDK's (for its life), its on/off switch,
        # a sampler of the SDK's own (asked again when the sampler changes).
        self._sdk_tracer = self._tracer if type(self._tracer) is sdk_trace.Tracer else None
        self._is_enabled = getattr(self._sdk_tracer, "_is_enabled", None)  # absent in older SDKs: on
        self._sdk_sampler = False
        # task id -> (span, context token, thread or greenlet, task, request); one
        # entry per task running in this process.
        self._live: dict[str, tuple[trace.Span, object, object, Any, Any]] = {}
        self.hooks = hooks
        self._displaced: list[tuple[Any, Any]] = []
        self._textmap: object = None
        self._w3c = False
        self._sampler: object = None
        self._drops_unsampled = False
        self._current = _current_context_variable()

    def connect(self) -> None:
        for signal, handler in _upstream_consumer_handlers():
            if signal.disconnect(handler):
                self._displaced.append((signal, handler))
        if self.hooks:
            # Sent only when a run fails outside its body: no cost per task.
            signals.task_internal_error.connect(self.on_internal_error, weak=False)
            return
        signals.task_prerun.connect(self.on_prerun, weak=False)
        signals.task_postrun.connect(self.on_postrun, weak=False)
        signals.task_failure.connect(self.on_failure, weak=False)
        signals.task_retry.connect(self.on_retry, weak=False)

    def disconnect(self) -> None:
        if self.hooks:
            signals.task_internal_error.disconnect(self.on_internal_error)
        else:
            signals.task_prerun.disconnect(self.on_prerun)
            signals.task_postrun.disconnect(self.on_postrun)
            signals.task_failure.disconnect(self.on_failure)
            signals.task_retry.disconnect(self.on_retry)
        for signal, handler in self._displaced:
            signal.connect(handler, weak=False)
        self._displaced.clear()
        self._live.clear()

    def on_prerun(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        if task is not None and task_id:
            self.start(task_id, task)

    def start(self, task_id: str, task: Any) -> None:
        request, name = task.request, task.name
        attributes: dict[str, Any] = {
            "celery.action": "run",
            "celery.task_name": name,
            "messaging.message.id": task_id,
        }
        delivery = getattr(request, "delivery_info", None)
        if isinstance(delivery, dict) and isinstance(routing_key := delivery.get("routing_key"), str):
            attributes["messaging.destination"] = routing_key
        retries = getattr(request, "retries", 0)
        if isinstance(retries, int) and retries > 0:
            attributes["celery.retries"] = retries
        textmap = propagate.get_global_textmap()
        if textmap is not self._textmap:  # set at startup, and by tests
            self._textmap, self._w3c = textmap, textmap.fields <= _W3C_FIELDS
        # deferring_tracer(self._tracer), its checks per task (the switch, the sampler) inline
        sdk_tracer, is_enabled = self._sdk_tracer, self._is_enabled
        deferrable = None
        if sdk_tracer is not None and (is_enabled is None or is_enabled()):
            sampler = sdk_tracer.sampler
            if sampler is not self._sampler:  # set at startup, and by tests
                self._sampler, self._drops_unsampled = sampler, drops_unsampled_remote(sampler)
                self._sdk_sampler = sdk_sampler(sampler)
            if self._sdk_sampler:
                deferrable = _deferrable(request, self._w3c, self._drops_unsampled)
        span: trace.Span
        if deferrable is not None and sdk_tracer is not None:
            carrier, recording = deferrable
            # Every value above is a str or an int but the task's name and id, which Celery gives
            # as str: the span's attributes then need no checking (start_deferred_span's ``plain``).
            plain = type(name) is str and type(task_id) is str
            span = start_deferred_span(sdk_tracer, f"run/{name}", carrier, SpanKind.CONSUMER, attributes,
                                       recording=recording, plain=plain)  # fmt: skip
            current = self._current
            if current is not None:  # context.attach(trace.set_span_in_context(span)), in two calls
                variable, key = current
                values = variable.get().copy()
                values[key] = span
                token = variable.set(Context(values))
            else:
                token = context.attach(trace.set_span_in_context(span))
        else:
            parent = propagate.extract(request, getter=_GETTER)
            span = start_lean_span(self._tracer, f"run/{name}", parent, SpanKind.CONSUMER, attributes)
            token = context.attach(trace.set_span_in_context(span, parent))
        self._live[task_id] = (span, token, get_ident(), task, request)

    def on_postrun(self, task_id: str | None = None, state: str | None = None, **_: Any) -> None:
        if task_id:
            self.end(task_id, state)

    def end(self, task_id: str, state: str | None) -> None:
        entry = self._live.pop(task_id, None)
        if entry is None:
            return
        span, token = entry[0], entry[1]
        if state is not None:
            span.set_attribute("celery.state", str(state))
        span.end()
        current = self._current
        if current is None:
            context.detach(token)  # type: ignore[arg-type]  # logs, never raises
            return
        try:  # context.detach(token): the same variable's token, whichever path attached it
            current[0].reset(token)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a token of another context (the API logs it too): not the task's failure
            log.exception("Failed to detach context")

    def on_failure(self, task_id: str | None = None, exception: BaseException | None = None,
                   sender: Any = None, **_: Any) -> None:  # fmt: skip
        """``task_failure``'s receiver; on the hook path, called as ``(task_id, exception, task)``."""
        entry = self._live.get(task_id) if task_id else None
        if entry is None or not entry[0].is_recording():
            return
        span = entry[0]
        throws = getattr(sender, "throws", ())
        if exception is not None and throws and isinstance(exception, tuple(throws)):
            return  # an expected exception: Celery logs it at INFO, we do not call it an error
        if exception is not None:
            _record_error(span, exception)
        else:
            span.set_status(Status(StatusCode.ERROR))

    def on_retry(self, request: Any = None, reason: Any = None, **_: Any) -> None:
        task_id = getattr(request, "id", None)
        if isinstance(task_id, str):
            self.retried(task_id, reason)

    def retried(self, task_id: str, reason: Any) -> None:
        entry = self._live.get(task_id)
        if entry is not None and entry[0].is_recording():
            entry[0].set_attribute("celery.retry.reason", str(reason))

    # -- the hook path (TracedTask) ---------------------------------------------

    def hook_retry(self, task_id: str, exc: BaseException) -> None:
        # Celery calls on_retry while handling the Retry the task raised; its
        # text ("Retry in 5s: ...") is what the signal path records.
        reason = sys.exc_info()[1]
        self.retried(task_id, reason if isinstance(reason, Retry) else exc)
        self.end(task_id, "RETRY")

    def hook_start(self, task_id: str, task: Any) -> None:
        if self._live:  # empty at every start but in thread pools, nested eager runs and after a leak
            self._sweep()
        self.start(task_id, task)

    def _sweep(self) -> None:
        """End this thread's (greenlet's) spans whose run is over (its request is off its
        task's stack) though no hook ended them: a subclass hook that did not
        call ``super()``, a ``Reject`` or ``MemoryError`` raised out of
        ``on_success``. They end late, and say so, rather than leave their
        context attached."""
        me = get_ident()
        for task_id, (span, _token, thread, task, request) in list(self._live.items()):
            if thread == me and request not in task.request_stack.stack:
                if span.is_recording():
                    span.set_attribute("cadscope.span.ended_late", True)
                log.warning("task %s's span was left open by its run; ended late", task_id)
                self.end(task_id, None)

    def ended_outside_hooks(self, task: Any, exc: BaseException) -> None:
        """A run that left through ``Ignore``, ``Reject`` or a BaseException:
        Celery calls no hook after it, so its span ends here. (A task that
        calls itself directly, catches such an exception from that call and
        goes on would end its span here too early: the request it then sees
        is its own run's.)"""
        task_id = getattr(task.request, "id", None)
        if not isinstance(task_id, str) or (entry := self._live.get(task_id)) is None:
            return
        if isinstance(exc, Ignore):
            state = "IGNORED"
        elif isinstance(exc, Reject):
            state = "REJECTED"
        else:
            state = None
            if entry[0].is_recording():
                _record_error(entry[0], exc)
        self.end(task_id, state)

    def on_internal_error(self, task_id: str | None = None, exception: BaseException | None = None, **_: Any) -> None:
        """A run that failed outside its body (storing its result, say): Celery
        sends this, then marks the task FAILURE, with no hook in between."""
        if not task_id or (entry := self._live.get(task_id)) is None:
            return
        if exception is not None and entry[0].is_recording():
            _record_error(entry[0], exception)
        self.end(task_id, "FAILURE")


def _record_error(span: trace.Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, str(exc)))


_installed: _WorkerTracing | None = None


class TracedTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """A task class whose runs cadscope traces through the task's own hooks.

    Make it the app's default (``Celery(..., task_cls=TracedTask)``, as
    cadscope's worker app does) and pass the app to
    :func:`instrument_celery_worker`: if every task registered on the app is
    one, Celery's ``task_prerun``/``task_postrun`` signals get no receiver,
    and Celery then skips sending them (bench/RESULTS.md, "Task hooks
    instead of signals").

    Where the span starts and ends, against the signal path:

    - it starts in ``before_start``, after Celery has stored the ``STARTED``
      state (``task_track_started``), so that write is not inside it;
    - it ends in ``after_return`` (success, failure), ``on_retry`` (after the
      ``RETRY`` state is stored; Celery's "retry" log line that follows has
      no trace ids), in a wrapper of the task's ``run`` for a run that leaves through
      ``Ignore`` (``Task.replace``), ``Reject`` or a BaseException, none of
      which has a hook after it, and on ``task_internal_error``, a signal
      sent only when a run fails outside its body;
    - a subclass that overrides these hooks must call ``super()``. A span
      that no hook ended (a hook that did not, a ``Reject`` raised out of
      ``on_success``) is ended, late, with ``cadscope.span.ended_late``,
      when the same thread starts its next task.

    Outside a traced worker (``instrument_celery_worker`` not called, or the
    signal path chosen) the hooks do nothing.
    """

    # Whether before_start and after_return call the next class's in the MRO: not where that is Celery's
    # Task's, which does nothing (set for each subclass; see _calls_next).
    _next_before_start = True
    _next_after_return = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("run")
        if run is not None and not getattr(run, _ENDS_OUTSIDE_HOOKS, False):
            setattr(cls, "run", _ending_outside_hooks(run))  # noqa: B010 - mypy: not a method assignment
        cls._next_before_start = _calls_next(cls, "before_start")
        cls._next_after_return = _calls_next(cls, "after_return")

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        # Run on every task: _on_hook_path's work, inline.
        tracing = _installed
        if tracing is not None and tracing.hooks:
            try:
                tracing.hook_start(task_id, self)
            except Exception:  # noqa: BLE001
                log.warning("task tracing failed in hook_start", exc_info=True)
        if self._next_before_start:
            super().before_start(task_id, args, kwargs)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        _on_hook_path("on_failure", task_id, exc, self)
        super().on_failure(exc, task_id, args, kwargs, einfo)

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        try:
            super().on_retry(exc, task_id, args, kwargs, einfo)
        finally:
            _on_hook_path("hook_retry", task_id, exc)

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        try:
            if self._next_after_return:
                super().after_return(status, retval, task_id, args, kwargs, einfo)
        finally:
            # Run on every task: _on_hook_path's work, inline.
            tracing = _installed
            if tracing is not None and tracing.hooks:
                try:
                    tracing.end(task_id, status)
                except Exception:  # noqa: BLE001
                    log.warning("task tracing failed in end", exc_info=True)


_ENDS_OUTSIDE_HOOKS = "_cadscope_ends_outside_hooks"


def _documented_nothing(*_: Any) -> None:
    """Nothing."""


def _nothing(*_: Any) -> None:
    pass


# The bytecode of a function that returns a constant and does nothing else, with a docstring and without.
_DOES_NOTHING = frozenset({_documented_nothing.__code__.co_code, _nothing.__code__.co_code})


def _calls_next(cls: type, name: str) -> bool:
    """Whether :class:`TracedTask`'s hook ``name`` must call ``super()``'s for an instance of ``cls``: unless the
    next ``name`` in ``cls``'s MRO is Celery's ``Task``'s and its bytecode only returns a constant (in
    Celery 5 every hook is a docstring; its return value is ignored).

    Task hooks run on every task, and ``super()`` makes an object, finds the method along the MRO and
    calls it: on a busy host that read ~120 cache lines a task from memory for the two hooks, a tenth
    of what cadscope adds to a no-op task (bench/RESULTS.md, "Task hooks without super()"). A
    mixin between TracedTask and Task in the MRO, or a Celery whose hook does something, is called."""
    mro = cls.__mro__
    for klass in mro[mro.index(TracedTask) + 1 :]:
        if name in klass.__dict__:
            code = getattr(klass.__dict__[name], "__code__", None)
            return not (klass is Task and code is not None and code.co_code in _DOES_NOTHING)
    return False


def _ending_outside_hooks(run: Any) -> Any:
    """``run`` (a function, or the ``staticmethod`` of an ``@app.task`` without ``bind``) as a method
    that ends the task's span when the run leaves through ``Ignore``, ``Reject`` or a BaseException,
    which no hook follows.

    Wrapping ``run`` rather than overriding ``__call__`` keeps Celery's fast path: for a task class
    with no ``__call__`` of its own, a worker's tracer calls ``task.run`` directly. With an override
    it calls the task, whose ``__call__`` then goes through ``Task.__call__`` (a worker's stack
    protection, which checks the request stack before calling ``run``): three calls a task for one."""
    if isinstance(run, staticmethod):  # the body takes no task
        body = run.__func__

        @functools.wraps(body)
        def traced_run(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return body(*args, **kwargs)
            except BaseException as exc:
                _left_past_hooks(self, exc)
                raise

    else:
        body = run

        @functools.wraps(body)
        def traced_run(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return body(self, *args, **kwargs)
            except BaseException as exc:
                _left_past_hooks(self, exc)
                raise

    setattr(traced_run, _ENDS_OUTSIDE_HOOKS, True)
    return traced_run


def _left_past_hooks(task: Any, exc: BaseException) -> None:
    """End the span of a run that leaves through ``Ignore``, ``Reject`` or a BaseException; any other
    exception is a failure, whose span ``after_return`` or ``on_retry`` ends."""
    if isinstance(exc, (Ignore, Reject)) or not isinstance(exc, Exception):
        _on_hook_path("ended_outside_hooks", task, exc)


def _on_hook_path(method: str, *args: Any) -> None:
    """Call the installed task tracing's ``method`` if it traces through the
    hooks; log, never raise: tracing must not fail a task."""
    tracing = _installed
    if tracing is not None and tracing.hooks:
        try:
            getattr(tracing, method)(*args)
        except Exception:  # noqa: BLE001
            log.warning("task tracing failed in %s", method, exc_info=True)


def instrument_celery_worker(tracer_provider: trace.TracerProvider | None = None, app: Any = None) -> None:
    """Trace every task this process runs (idempotent; call after fork, in
    ``worker_process_init``, once the tracer provider exists).

    Given ``app``, and every task registered on it a :class:`TracedTask`,
    task runs are traced through the tasks' hooks, with no receiver on
    Celery's per-task signals. Otherwise through those signals, which see
    every task whatever its class. A task registered on the app after this
    call, of another class, would not be traced on the hook path.
    """
    global _installed
    if _installed is not None:
        return
    hooks = False
    if app is not None:
        others = sorted(name for name, task in app.tasks.items() if not isinstance(task, TracedTask))
        hooks = not others
        if others:
            log.info("tracing task runs through Celery's signals: not TracedTask: %s", ", ".join(others[:5]))
    _installed = _WorkerTracing(tracer_provider, hooks)
    _installed.connect()


def uninstrument_celery_worker() -> None:
    global _installed
    if _installed is not None:
        _installed.disconnect()
        _installed = None
