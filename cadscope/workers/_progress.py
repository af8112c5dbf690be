"""Job progress events and worker heartbeats, for the API to replay.

One ordered stream of events per job: a Redis stream ``cadscope:progress:<id>``
when the broker is Redis, a JSON-lines file under the data directory for the
embedded broker. Streams expire (``PROGRESS_TTL_S``). The last event of every
job is ``job.finished``.

The progress service has the model-generation progress calls (``publish_document_progress``,
``publish_assembly4_progress``, ...) and counts every event it publishes.
Publishing never raises into a job: a progress store that is down loses
progress events (counted), not jobs.

The same store keeps what makes a job id run at most once to its end:

- the API's submission record per job id (``claim_submission``): the
  request's fingerprint, the payload it publishes and, once the broker took
  it, the response, so a retry with the same ``Idempotency-Key`` gets the same
  job and never a twin;
- a run lease and a finished marker per job id (``claim_run``): a delivery of
  a job that already ran to its end is dropped (its earlier result is
  returned again) and one that arrives while another delivery of the same job
  runs is dropped; both are counted in
  ``cadscope_task_duplicates_dropped_total{reason}``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter

from ..metrics import default_observability

__all__ = [
    "TERMINAL",
    "FileStore",
    "Heartbeat",
    "ProgressService",
    "ProgressStore",
    "RedisStore",
    "claim_run",
    "progress_store",
]

log = logging.getLogger("cadscope.progress")

PROGRESS_TTL_S = 24 * 3600
HEARTBEAT_TTL_S = 30
MAX_EVENTS_PER_JOB = 5_000
TERMINAL = "job.finished"
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

_PUBLISHED: Counter | None = None


def _published_counter() -> Counter:
    global _PUBLISHED
    if _PUBLISHED is None:
        _PUBLISHED = Counter(
            "cadscope_progress_events", "Progress events published, by kind and result.", ("kind", "result")
        )
    return _PUBLISHED


# The run lease: taken when absent, else handed back to the caller to judge.
_BEGIN_RUN = """
local done = redis.call('GET', KEYS[1])
if done then return {'finished', done} end
local holder = redis.call('GET', KEYS[2])
if holder then return {'held', holder} end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return {'run', ''}
"""
# Take a lease over from a holder judged dead, only if it is still that holder's.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


class ProgressStore(Protocol):
    def append(self, job_id: str, event: Mapping[str, Any]) -> None: ...

    def read(self, job_id: str, after: str = "0", block_ms: int = 0) -> list[tuple[str, dict[str, Any]]]: ...

    def exists(self, job_id: str) -> bool: ...

    def heartbeat(self, node: str, info: Mapping[str, Any]) -> None: ...

    def workers(self) -> dict[str, dict[str, Any]]: ...

    def record_attempt(
        self, job_id: str, started: float, traceparent: str | None = None
    ) -> list[tuple[float, str | None]]:
        """Append this delivery's start time and its task span's ``traceparent``; return every
        attempt's so far, in order."""
        ...

    def claim_submission(self, job_id: str, record: Mapping[str, Any], ttl_s: int) -> dict[str, Any] | None:
        """Store ``record`` for ``job_id`` unless one is there; return the one that was there."""
        ...

    def submission(self, job_id: str) -> dict[str, Any] | None: ...

    def update_submission(self, job_id: str, record: Mapping[str, Any], ttl_s: int) -> None: ...

    def begin_run(self, job_id: str, owner: str, ttl_s: int) -> tuple[str, str]:
        """``("finished", result)``, ``("held", holder)`` or ``("run", "")`` (the lease is now ``owner``'s)."""
        ...

    def take_over_run(self, job_id: str, holder: str, owner: str, ttl_s: int) -> bool: ...

    def end_run(self, job_id: str, result: Mapping[str, Any], ttl_s: int) -> None: ...

    def finished(self, job_id: str) -> dict[str, Any] | None:
        """What :meth:`end_run` stored for ``job_id`` (None: not finished, or expired)."""
        ...

    def claim_once(self, job_id: str, what: str, ttl_s: int) -> bool:
        """True for the first caller only, for ``what`` of ``job_id``, across processes and hosts."""
        ...


def _attempt_entry(started: float, traceparent: str | None) -> str:
    return f"{started!r} {traceparent}" if traceparent else repr(started)


def _parse_attempt(entry: str) -> tuple[float, str | None]:
    started, _, traceparent = entry.strip().partition(" ")
    return float(started), traceparent or None


def _check_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return job_id


class RedisStore:
    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        import redis

        # decode_responses=True: replies are str, which redis-py's stubs cannot express.
        self._redis: Any = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, decode_responses=True
        )

    @staticmethod
    def _key(job_id: str) -> str:
        return f"cadscope:progress:{_check_id(job_id)}"

    def append(self, job_id: str, event: Mapping[str, Any]) -> None:
        key = self._key(job_id)
        pipe = self._redis.pipeline()
        pipe.xadd(key, {"e": json.dumps(event, default=str)}, maxlen=MAX_EVENTS_PER_JOB, approximate=True)
        pipe.expire(key, PROGRESS_TTL_S)
        pipe.execute()

    def read(self, job_id: str, after: str = "0", block_ms: int = 0) -> list[tuple[str, dict[str, Any]]]:
        key = self._key(job_id)
        if block_ms:
            # The socket timeout must outlast the block.
            reply = self._redis.xread({key: after}, count=500, block=block_ms)
            entries = reply[0][1] if reply else []
        else:
            entries = self._redis.xrange(key, min=f"({after}" if after != "0" else "-", count=500)
        return [(entry_id, json.loads(fields["e"])) for entry_id, fields in entries]

    def exists(self, job_id: str) -> bool:
        return bool(self._redis.exists(self._key(job_id)))

    def heartbeat(self, node: str, info: Mapping[str, Any]) -> None:
        self._redis.set(f"cadscope:worker:{node}", json.dumps(info, default=str), ex=HEARTBEAT_TTL_S)

    def record_attempt(
        self, job_id: str, started: float, traceparent: str | None = None
    ) -> list[tuple[float, str | None]]:
        # Redis redelivery carries no count: we keep our own, one entry per delivery.
        key = f"cadscope:attempts:{_check_id(job_id)}"
        pipe = self._redis.pipeline()
        pipe.rpush(key, _attempt_entry(started, traceparent))
        pipe.expire(key, PROGRESS_TTL_S)
        pipe.lrange(key, 0, -1)
        return [_parse_attempt(x) for x in pipe.execute()[2]]

    def claim_submission(self, job_id: str, record: Mapping[str, Any], ttl_s: int) -> dict[str, Any] | None:
        key = f"cadscope:submission:{_check_id(job_id)}"
        if self._redis.set(key, json.dumps(record), nx=True, ex=ttl_s):
            return None
        return self.submission(job_id) or None

    def submission(self, job_id: str) -> dict[str, Any] | None:
        value = self._redis.get(f"cadscope:submission:{_check_id(job_id)}")
        return json.loads(value) if value else None

    def update_submission(self, job_id: str, record: Mapping[str, Any], ttl_s: int) -> None:
        self._redis.set(f"cadscope:submission:{_check_id(job_id)}", json.dumps(record), ex=ttl_s)

    def begin_run(self, job_id: str, owner: str, ttl_s: int) -> tuple[str, str]:
        keys = [f"cadscope:finished:{_check_id(job_id)}", f"cadscope:lease:{job_id}"]
        state, value = self._redis.register_script(_BEGIN_RUN)(keys=keys, args=[owner, ttl_s])
        return str(state), str(value)

    def take_over_run(self, job_id: str, holder: str, owner: str, ttl_s: int) -> bool:
        script = self._redis.register_script(_TAKE_OVER)
        return bool(script(keys=[f"cadscope:lease:{_check_id(job_id)}"], args=[holder, owner, ttl_s]))

    def end_run(self, job_id: str, result: Mapping[str, Any], ttl_s: int) -> None:
        pipe = self._redis.pipeline()
        pipe.set(f"cadscope:finished:{_check_id(job_id)}", json.dumps(result, default=str), ex=ttl_s)
        pipe.delete(f"cadscope:lease:{job_id}")
        pipe.execute()

    def finished(self, job_id: str) -> dict[str, Any] | None:
        value = self._redis.get(f"cadscope:finished:{_check_id(job_id)}")
        record = json.loads(value) if value else None
        return record if isinstance(record, dict) else None

    def claim_once(self, job_id: str, what: str, ttl_s: int) -> bool:
        return bool(self._redis.set(f"cadscope:once:{what}:{_check_id(job_id)}", "1", nx=True, ex=ttl_s))

    def workers(self) -> dict[str, dict[str, Any]]:
        found = {}
        for key in self._redis.scan_iter("cadscope:worker:*", count=100):
            value = self._redis.get(key)
            if value:
                found[key.split(":", 2)[2]] = json.loads(value)
        return found

    def ping(self) -> bool:
        return bool(self._redis.ping())


class FileStore:
    """JSON lines per job; ids are line numbers. One host only (the embedded broker)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root)
        (self._root / "progress").mkdir(parents=True, exist_ok=True)
        (self._root / "workers").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, job_id: str) -> Path:
        return self._root / "progress" / f"{_check_id(job_id)}.jsonl"

    def append(self, job_id: str, event: Mapping[str, Any]) -> None:
        line = (json.dumps(event, default=str) + "\n").encode()
        fd = os.open(self._path(job_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self, job_id: str, after: str = "0", block_ms: int = 0) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + block_ms / 1000
        skip = int(after) if after.isdigit() else 0
        while True:
            try:
                lines = self._path(job_id).read_text().splitlines()
            except FileNotFoundError:
                lines = []
            events = [(str(n), json.loads(line)) for n, line in enumerate(lines, 1) if n > skip and line]
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(0.05)

    def exists(self, job_id: str) -> bool:
        path = self._path(job_id)
        return path.exists() and time.time() - path.stat().st_mtime < PROGRESS_TTL_S

    def record_attempt(
        self, job_id: str, started: float, traceparent: str | None = None
    ) -> list[tuple[float, str | None]]:
        path = self._root / "progress" / f"{_check_id(job_id)}.attempts"
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{_attempt_entry(started, traceparent)}\n".encode())
            return [_parse_attempt(x) for x in path.read_text().splitlines() if x.strip()]
        finally:
            os.close(fd)

    def _locked(self, job_id: str, suffix: str) -> tuple[int, Path]:
        """An exclusive lock on this job's ``suffix`` records (one host, many processes)."""
        path = self._root / "progress" / f"{_check_id(job_id)}.{suffix}"
        fd = os.open(self._root / "progress" / f"{job_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, path

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            if time.time() - path.stat().st_mtime >= PROGRESS_TTL_S:
                return None
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    @staticmethod
    def _write_json(path: Path, value: Any) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(value, default=str))
        tmp.replace(path)

    def claim_submission(self, job_id: str, record: Mapping[str, Any], ttl_s: int) -> dict[str, Any] | None:
        fd, path = self._locked(job_id, "submission")
        try:
            found = self._read_json(path)
            if found is None:
                self._write_json(path, dict(record))
            return found  # type: ignore[no-any-return]
        finally:
            os.close(fd)

    def submission(self, job_id: str) -> dict[str, Any] | None:
        return self._read_json(self._root / "progress" / f"{_check_id(job_id)}.submission")  # type: ignore[no-any-return]

    def update_submission(self, job_id: str, record: Mapping[str, Any], ttl_s: int) -> None:
        fd, path = self._locked(job_id, "submission")
        try:
            self._write_json(path, dict(record))
        finally:
            os.close(fd)

    def begin_run(self, job_id: str, owner: str, ttl_s: int) -> tuple[str, str]:
        fd, lease = self._locked(job_id, "lease")
        try:
            done = self._read_json(self._finished_path(job_id))
            if done is not None:
                return "finished", json.dumps(done)
            try:
                if time.time() - lease.stat().st_mtime < ttl_s:
                    return "held", lease.read_text()
            except FileNotFoundError:
                pass
            lease.write_text(owner)
            return "run", ""
        finally:
            os.close(fd)

    def take_over_run(self, job_id: str, holder: str, owner: str, ttl_s: int) -> bool:
        fd, lease = self._locked(job_id, "lease")
        try:
            try:
                if lease.read_text() != holder:
                    return False
            except FileNotFoundError:
                return False
            lease.write_text(owner)
            return True
        finally:
            os.close(fd)

    def end_run(self, job_id: str, result: Mapping[str, Any], ttl_s: int) -> None:
        fd, lease = self._locked(job_id, "lease")
        try:
            self._write_json(self._finished_path(job_id), dict(result))
            lease.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _finished_path(self, job_id: str) -> Path:
        return self._root / "progress" / f"{_check_id(job_id)}.finished"

    def finished(self, job_id: str) -> dict[str, Any] | None:
        # No lock: the record is written whole (a rename), and a job that never ran gets no lock file.
        record = self._read_json(self._finished_path(job_id))
        return record if isinstance(record, dict) else None

    def claim_once(self, job_id: str, what: str, ttl_s: int) -> bool:
        if not re.fullmatch(r"[a-z_-]{1,32}", what):
            raise ValueError(f"not a claim name: {what!r}")
        path = self._root / "progress" / f"{_check_id(job_id)}.once-{what}"
        for _ in range(2):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                return True
            except FileExistsError:
                try:
                    if time.time() - path.stat().st_mtime < ttl_s:
                        return False
                    path.unlink()  # expired, as a Redis key would: claimed anew
                except FileNotFoundError:
                    pass
        return False

    def heartbeat(self, node: str, info: Mapping[str, Any]) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", node)[:128]
        tmp = self._root / "workers" / f".{safe}.tmp"
        tmp.write_text(json.dumps(info, default=str))
        tmp.replace(self._root / "workers" / f"{safe}.json")

    def workers(self) -> dict[str, dict[str, Any]]:
        found = {}
        now = time.time()
        for path in (self._root / "workers").glob("*.json"):
            if now - path.stat().st_mtime < HEARTBEAT_TTL_S:
                found[path.stem] = json.loads(path.read_text())
        return found

    def ping(self) -> bool:
        return self._root.is_dir()


def progress_store(broker_url: str | None, data_dir: str | os.PathLike[str]) -> RedisStore | FileStore:
    """Redis streams next to a Redis broker, files next to the embedded one."""
    url = os.environ.get("CADSCOPE_PROGRESS_URL") or broker_url or ""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    return FileStore(data_dir)


class ProgressService:
    """The model-generation progress calls; each appends an event and counts it."""

    def __init__(self, store: ProgressStore) -> None:
        self.store = store

    def publish(self, job_id: str, kind: str, **fields: Any) -> None:
        event = {"type": kind, "ts": time.time(), **fields}
        try:
            self.store.append(job_id, event)
            result = "ok"
        except Exception as exc:  # noqa: BLE001 - progress is best effort; the job goes on
            log.warning("progress event lost", extra={"kind": kind, "error": type(exc).__name__})
            result = "error"
        _published_counter().labels(kind if kind in _KINDS else "other", result).inc()

    def publish_stage(self, job_id: str, stage: str, phase: str, **fields: Any) -> None:
        self.publish(job_id, f"stage.{phase}", stage=stage, **fields)

    def publish_document_progress(self, job_id: str, phase: str, document_id: str = "", **fields: Any) -> None:
        self.publish(job_id, "document", phase=phase, document_id=document_id, **fields)

    def publish_assembly4_progress(
        self, job_id: str, phase: str, constraints_resolved: int = 0, constraints_total: int = 0, **fields: Any
    ) -> None:
        self.publish(job_id, "assembly4", phase=phase, constraints_resolved=constraints_resolved,
                     constraints_total=constraints_total, **fields)  # fmt: skip

    def publish_export_progress(self, job_id: str, phase: str, format: str, done: int, total: int) -> None:  # noqa: A002
        self.publish(job_id, "export", phase=phase, format=format, done=done, total=total)

    def publish_child_event(self, job_id: str, attributes: Mapping[str, Any]) -> None:
        """A progress event from the CAD child (already bounded by the replay)."""
        fields = {k: v for k, v in attributes.items() if k != "kind"}
        kind = str(attributes.get("kind", ""))
        if kind == "document":
            self.publish_document_progress(job_id, **fields)
        elif kind == "assembly4":
            self.publish_assembly4_progress(job_id, **fields)
        elif kind == "export":
            self.publish_export_progress(job_id, **fields)
        else:
            self.publish(job_id, "other", **fields)

    def finish(self, job_id: str, result: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """The job's last event; ``result`` (else ``fields``) is what a later duplicate
        delivery of the job gets back instead of running it again (:func:`claim_run`)."""
        self.publish(job_id, TERMINAL, **fields)
        try:
            self.store.end_run(job_id, result if result is not None else fields, PROGRESS_TTL_S)
        except Exception as exc:  # noqa: BLE001 - without the store a duplicate runs again; the job is done
            log.warning("finished marker lost", extra={"error": type(exc).__name__})

    def follow(self, job_id: str, after: str = "0", timeout_s: float = 3600) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every event from ``after`` on, until ``job.finished`` or the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for entry_id, event in self.store.read(job_id, after, block_ms=1000):
                after = entry_id
                yield entry_id, event
                if event.get("type") == TERMINAL:
                    return


_KINDS = frozenset(
    {"job.submitted", "stage.started", "stage.finished", "document", "assembly4", "export", "attempt.lost",
     TERMINAL, "other"}
)  # fmt: skip


def _owner(publish_id: str | None) -> dict[str, Any]:
    import psutil

    return {"publish": publish_id, "host": socket.gethostname(), "pid": os.getpid(),
            "born": psutil.Process().create_time()}  # fmt: skip


def _alive(holder: Mapping[str, Any]) -> bool:
    """Whether the process that holds a lease on this host still runs (pid and start time)."""
    import psutil

    try:
        return bool(psutil.Process(int(holder["pid"])).create_time() == holder.get("born"))
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def claim_run(service: ProgressService, job_id: str, publish_id: str | None, lease_s: int) -> dict[str, Any] | None:
    """Called first by a job's task: ``None`` means run it; a dict is the result of the
    job's earlier run, to return again instead of running (the job already ran to its
    end). Raises :class:`celery.exceptions.Ignore` (acknowledged, no state stored) for
    a delivery that arrives while another delivery of the same job id is running.

    ``publish_id`` tells one publish of a job from another (the API's retry after an
    in-doubt publish is another publish; a redelivery of the same message is not).
    A delivery never drops a job that could otherwise be lost: only a twin whose
    holder is running, or whose own message the broker still holds, is dropped; a
    lease left by a process that died on this host is taken over; and without the
    store (down) the job runs.
    """
    from celery.exceptions import Ignore
    from opentelemetry import trace

    store = service.store
    me = json.dumps(_owner(publish_id))
    try:
        state, value = store.begin_run(job_id, me, lease_s)
        if state == "held":
            holder: dict[str, Any] = json.loads(value) if value.startswith("{") else {}
            same_message = publish_id is not None and holder.get("publish") == publish_id
            if holder.get("host") == socket.gethostname():
                twin = not same_message and _alive(holder)
            else:  # another host's: its own message is redelivered if that holder dies
                twin = publish_id is not None and holder.get("publish") not in (None, publish_id)
            if not twin:
                # Taken over from a dead holder; a holder that just changed means a twin won.
                state = "run" if store.take_over_run(job_id, value, me, lease_s) else "held"
    except Exception as exc:  # noqa: BLE001 - without the store we cannot tell: run the job
        log.warning("run lease unavailable", extra={"error": type(exc).__name__})
        return None
    if state == "run":
        return None
    reason = "finished" if state == "finished" else "running"
    default_observability().record_duplicate_dropped(reason)
    span = trace.get_current_span()
    span.set_attributes({"cad.job_id": job_id, "cad.duplicate": reason})
    log.warning("duplicate delivery dropped", extra={"job_id": job_id, "reason": reason})
    if state == "finished":
        try:
            earlier = json.loads(value)
        except ValueError:
            earlier = None
        if isinstance(earlier, dict):
            return earlier
    raise Ignore()


class Heartbeat(threading.Thread):
    """Refreshes this worker's heartbeat (engines, versions) every few seconds."""

    def __init__(self, store: ProgressStore, node: str, info: Mapping[str, Any], interval_s: float = 5.0) -> None:
        super().__init__(name="cadscope-heartbeat", daemon=True)
        self.store, self.node, self.info, self.interval_s = store, node, dict(info), interval_s

    def run(self) -> None:
        while True:
            try:
                self.store.heartbeat(self.node, {**self.info, "ts": time.time()})
            except Exception as exc:  # noqa: BLE001 - a broker outage must not kill the worker
                log.warning("heartbeat failed", extra={"error": type(exc).__name__})
            time.sleep(self.interval_s)
