"""cadscope inside a CAD script: spans, metrics, progress and a result.

Standard library only: it runs in FreeCAD's own Python as well as in a plain
Python with OCP. Every process cadscope starts (``cadscope exec``, ``script``
and ``template`` jobs) finds it on its path as ``cadscope_child``::

    import cadscope_child as cadscope

    params = cadscope.parameters()          # a script job's parameters; {} otherwise
    with cadscope.span("bracket.ribs", {"cad.rib_count": params.get("ribs", 4)}) as span:
        ribs = make_ribs(...)
        span["cad.rib_volume"] = ribs.Volume
    cadscope.metric("occt.memory", 300_000_000, operation="ribs")
    cadscope.progress(phase="ribs", done=4, total=4)
    cadscope.result({"mass_kg": 1.25})      # lands in the run's result manifest

Without a telemetry pipe (the same script run by hand, with this folder on
``PYTHONPATH``: ``cadscope.freecad_bridge.child_path()``) every call is a no-op and
``parameters()`` is ``{}``. Nothing here ever raises into the script.

Names: a span name is lower-case letters, digits, ``_`` and ``.``, with at
most one qualifier after a space (``"cad.stage export"``); attribute keys
likewise, without the qualifier; other characters become ``_``. Values are
strings, numbers or booleans. A span named after an operation cadscope
measures becomes that metric too: ``occt.boolean`` (``cad.boolean.operation``,
``cad.solids_count``), ``occt.feature`` (``cad.feature``),
``document.recompute`` (``cad.object_count``, ``cad.workbench``), ``export``
(``cad.export.format``, ``cad.export.size_bytes``), ``document.load``.
``metric()`` takes the metric events the worker knows (``occt.memory`` with
``operation``, ``freecad.object_created`` with ``cls`` and ``workbench``,
``workbench.invocation`` with ``workbench``); others are counted as rejected.
"""

import json
import os
import re
import stat

from cadscope_probe import Probe

__all__ = ["enabled", "metric", "output_dir", "parameters", "progress", "result", "span"]

_NAME_CHARS = re.compile(r"[^a-z0-9_.]")
_QUALIFIER_CHARS = re.compile(r"[^a-z0-9_]")


def _clean_name(name, qualifier_allowed=True):
    """A name the worker accepts: ``area.operation`` and one optional qualifier."""
    text = str(name).strip().lower()
    head, _, qualifier = text.partition(" ") if qualifier_allowed else (text, "", "")
    head = _NAME_CHARS.sub("_", head)[:64] or "span"
    if not head[0].isalpha():
        head = ("x" + head)[:64]
    if qualifier:
        qualifier = _QUALIFIER_CHARS.sub("_", qualifier)[:32]
        return head + " " + qualifier
    return head


def _clean_attrs(attrs):
    out = {}
    for key, value in (attrs or {}).items():
        if isinstance(value, (str, bool, int, float)):
            out[_clean_name(key, qualifier_allowed=False)] = value
    return out


def _probe_from_env():
    """The process's probe, on the inherited pipe only if it is one.

    The variable is removed from this process's environment and the pipe made
    close-on-exec, so a program this script starts neither inherits the pipe
    nor writes to whatever file its number names there.
    """
    probe = Probe.from_env()
    fd = os.environ.pop("CADSCOPE_TELEMETRY_FD", None)
    if probe.enabled:
        try:
            if not stat.S_ISFIFO(os.fstat(int(fd)).st_mode):
                return Probe(None, os.environ.get("TRACEPARENT"))
            os.set_inheritable(int(fd), False)
        except (OSError, ValueError):
            return Probe(None, os.environ.get("TRACEPARENT"))
    return probe


class _Run:
    """What the run reports at its end: the root span, its error, the manifest."""

    def __init__(self, probe):
        self.probe = probe
        self.result = {}
        self.exports = []  # files the instrumented exports wrote: {"path", "format", "size"}
        self.error = None  # the exception that ended the script, if one did
        self.root = None  # id of the run's own root span, when it opened one
        self.root_attrs = {}
        self.manifest = None  # callable() -> manifest dict, set by a job's launcher
        self.finished = False
        self.counts = {}  # (metric, sorted attribute items) -> count, sent at flush_counts()

    def count(self, name, attrs):
        key = (name, tuple(sorted(attrs.items())))
        self.counts[key] = self.counts.get(key, 0) + 1

    def flush_counts(self):
        counts, self.counts = self.counts, {}
        for (name, items), value in counts.items():
            self.probe.observe(name, value, dict(items))
        self.probe.flush()

    def fail(self, error):
        if self.error is None:
            self.error = error

    def begin(self, name, attrs):
        """Open the run's root span (``cadscope exec``): every other span nests in it."""
        self.root = self.probe.start(name, attrs)

    def finish(self):
        """Close the root span and send the manifest, unless the script failed. Once."""
        if self.finished:
            return
        self.finished = True
        try:
            self.flush_counts()
        except Exception:  # noqa: BLE001 - telemetry gives way, never the script
            pass
        if self.root is not None:
            self.probe.end(self.root, self.root_attrs, self.error)
        if self.error is None:
            manifest = self.manifest() if self.manifest is not None else self.default_manifest()
            self.probe.result(manifest)
        self.probe.flush()

    def default_manifest(self):
        return {"kind": "exec", "exports": list(self.exports), "result": dict(self.result)}


_run = _Run(_probe_from_env())
#: True when this process reports to cadscope (a telemetry pipe was inherited).
enabled = _run.probe.enabled


class _NoSpan(dict):
    """What ``span()`` yields without a pipe: attributes land nowhere."""


class _UserSpan:
    __slots__ = ("_name", "_attrs", "_id", "_span")

    def __init__(self, name, attrs):
        self._name = name
        self._attrs = attrs
        self._id = None

    def __enter__(self):
        self._span = _NoSpan()
        if enabled:
            try:
                self._id = _run.probe.start(_clean_name(self._name), _clean_attrs(self._attrs))
            except Exception:  # noqa: BLE001
                self._id = None
        return self._span

    def __exit__(self, exc_type, exc, tb):
        if self._id is not None:
            try:
                _run.probe.end(self._id, _clean_attrs(self._span), exc)
            except Exception:  # noqa: BLE001
                pass
        return False


def span(name, attributes=None):
    """A span around a block: ``with span("my.step", {"cad.x": 1}) as s: s["cad.y"] = 2``.

    It nests in the innermost open span (yours or cadscope's); an exception
    leaving the block marks it as an error and goes on unchanged."""
    return _UserSpan(name, attributes)


def metric(name, value=1, **attributes):
    """A metric event for the worker (see the module's documentation for the names it knows)."""
    if enabled:
        try:
            _run.probe.metric(_clean_name(name, qualifier_allowed=False), value, **_clean_attrs(attributes))
        except Exception:  # noqa: BLE001
            pass


def progress(**attributes):
    """A progress event on the job's event stream (``GET /v1/jobs/{id}/events``)."""
    if enabled:
        try:
            _run.probe.progress(**_clean_attrs(attributes))
        except Exception:  # noqa: BLE001
            pass


def result(data):
    """Data for the run's result manifest (``manifest["result"]``), JSON values; merged over earlier calls."""
    try:
        _run.result.update(json.loads(json.dumps(dict(data), default=str)))
    except Exception:  # noqa: BLE001
        pass


_parameters = None


def parameters():
    """The parameters a ``script`` job was given (a dict), or ``{}``."""
    global _parameters
    if _parameters is None:
        path = os.environ.get("CADSCOPE_PARAMETERS")
        try:
            with open(path) as handle:
                loaded = json.load(handle)
            _parameters = loaded if isinstance(loaded, dict) else {}
        except (OSError, TypeError, ValueError):
            _parameters = {}
    return dict(_parameters)


def output_dir():
    """Where a job's outputs go: the job's output folder, or the current directory."""
    return os.environ.get("CADSCOPE_OUT") or os.getcwd()
