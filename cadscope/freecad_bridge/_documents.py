"""Input documents for the upload flow: fetched, verified, cached, before any engine runs.

Order of events for a job with ``input``:

1. ``download``: from the cache when a verified copy with that sha256 is there
   (hit), else from the artifact store: ``store://key`` is a file under the
   worker's document store directory; ``http(s)://`` is fetched with ranged
   requests, resuming where a dropped connection left off.
2. ``checksum``: the sha256 of the bytes on disk is compared with the job's,
   on every load, cache hits included. A mismatch rejects the job before the
   engine ever opens the file: ``cadscope_security_violations_total
   {violation_type="checksum_mismatch", severity="critical"}`` and a log record
   with ``security_event: true``.
3. ``load`` and ``validate`` happen in the engine (spans ``document.load`` and
   ``document.validate``).

The cache is a directory shared by a host's pool processes: files named by
sha256, admitted by atomic rename, evicted least recently used when the total
exceeds its byte budget.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace

from ..metrics import SECURITY_VIOLATION_SEVERITY, ModelObservability
from ._schema import InputDocument

__all__ = ["DocumentCache", "DocumentError", "fetch_document"]

log = logging.getLogger("cadscope.documents")
CHUNK = 1 << 20
SUFFIX = {"step": ".step", "brep": ".brep", "fcstd": ".FCStd", "py": ".py"}


class DocumentError(Exception):
    """The input document cannot be used; ``error_type`` is the metric label."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass
class DocumentCache:
    root: Path
    max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, doc: InputDocument) -> Path:
        return self.root / (doc.sha256 + SUFFIX[doc.format])

    def lookup(self, doc: InputDocument) -> Path | None:
        path = self.path_for(doc)
        try:
            os.utime(path)  # recently used
        except FileNotFoundError:
            return None
        return path

    def admit(self, staged: Path, doc: InputDocument) -> Path:
        path = self.path_for(doc)
        os.replace(staged, path)  # atomic: other pool processes see all of it or nothing
        self.evict(keep=path)
        return path

    def _scan(self) -> list[tuple[str, os.stat_result]]:
        """Cached documents (not the dot-named staging files), each with its stat;
        a file another pool process evicts meanwhile is skipped."""
        found = []
        for entry in os.scandir(self.root):
            if entry.is_file() and not entry.name.startswith("."):
                try:
                    found.append((entry.path, entry.stat()))
                except FileNotFoundError:
                    pass
        return found

    def entries(self) -> list[os.stat_result]:
        return [stat for _, stat in self._scan()]

    def evict(self, keep: Path | None = None) -> None:
        files = [(stat.st_mtime, stat.st_size, path) for path, stat in self._scan() if path != str(keep)]
        total = sum(size for _, size, _ in files) + (keep.stat().st_size if keep else 0)
        for _, size, path in sorted(files):  # oldest use first
            if total <= self.max_bytes:
                break
            try:
                os.unlink(path)
                total -= size
            except FileNotFoundError:
                pass

    def staging(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        os.close(fd)
        return Path(name)


def _copy_local(source: Path, dest: Path, expected: int | None, on_bytes: Callable[[int, int | None], None]) -> None:
    size = source.stat().st_size
    if expected is not None and size != expected:
        raise DocumentError("size_mismatch", f"the document is {size} bytes, the job says {expected}")
    done = 0
    with source.open("rb") as src, dest.open("wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            done += len(chunk)
            on_bytes(done, size)


def _download_http(
    url: str, dest: Path, expected: int | None, on_bytes: Callable[[int, int | None], None], *,
    timeout_s: float = 30.0, max_resumes: int = 5, max_bytes: int = 512 << 20,
) -> int:  # fmt: skip
    """Ranged, resumable GET: after a dropped connection, ask for ``bytes=<have>-``.
    Returns the number of resumes it took."""
    resumes = 0
    total = expected
    while True:
        have = dest.stat().st_size
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
                if have and response.status != 206:
                    have = 0  # the server ignored the range: start over
                    dest.write_bytes(b"")
                length = response.headers.get("Content-Length")
                if total is None and length and length.isdigit():
                    total = have + int(length)
                with dest.open("ab") as out:
                    while chunk := response.read(CHUNK):
                        have += len(chunk)
                        if have > max_bytes:
                            raise DocumentError("too_large", f"the document is larger than {max_bytes} bytes")
                        out.write(chunk)
                        on_bytes(have, total)
            if total is None or have >= total:
                return resumes
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and total is not None and have >= total:
                return resumes
            raise DocumentError("not_found" if exc.code == 404 else "download_failed", f"HTTP {exc.code}") from None
        except (OSError, urllib.error.URLError) as exc:
            if isinstance(exc, DocumentError):
                raise
            log.warning("document download interrupted; resuming", extra={"have": have, "error": type(exc).__name__})
        resumes += 1
        if resumes > max_resumes:
            raise DocumentError("download_failed", f"gave up after {max_resumes} resumed downloads")
        time.sleep(min(0.2 * resumes, 2.0))


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fetch_document(
    doc: InputDocument,
    *,
    cache: DocumentCache,
    store_root: Path,
    observability: ModelObservability,
    on_progress: Callable[[str, float], None] | None = None,
) -> Path:
    """A verified local copy of ``doc``, or :class:`DocumentError`."""
    obs = observability
    source = "http" if doc.uri.startswith(("http://", "https://")) else "store"
    tracer = trace.get_tracer("cadscope.documents")
    obs.record_document_load_attempt(source)

    def progress(stage: str, ratio: float) -> None:
        obs.set_document_load_progress(stage, ratio)
        if on_progress is not None:
            on_progress(stage, ratio)

    attributes = {"cad.document.source": source, "cad.document.format": doc.format, "cad.document.sha256": doc.sha256}
    with tracer.start_as_current_span("document.fetch", attributes=attributes) as span:
        try:
            path = _fetch(doc, source, cache, store_root, obs, progress, span)
        except DocumentError as exc:
            obs.record_document_load_failure(source, exc.error_type)
            span.set_attribute("error.type", exc.error_type)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
            raise
        finally:
            entries = cache.entries()
            obs.set_document_cache(len(entries), sum(e.st_size for e in entries))
        return path


def _fetch(
    doc: InputDocument, source: str, cache: DocumentCache, store_root: Path, obs: ModelObservability,
    progress: Callable[[str, float], None], span: trace.Span,
) -> Path:  # fmt: skip
    started = time.perf_counter()
    cached = cache.lookup(doc)
    span.set_attribute("cad.document.cache", "hit" if cached else "miss")
    obs.record_document_cache(hit=cached is not None)
    if cached is None:
        staged = cache.staging()
        try:
            last = [0.0]

            def on_bytes(done: int, total: int | None) -> None:
                if total and time.perf_counter() - last[0] > 0.1:
                    last[0] = time.perf_counter()
                    progress("download", min(done / total, 1.0))

            if source == "store":
                key = doc.uri.removeprefix("store://")
                root = store_root.resolve()
                path = (root / key).resolve()
                if root not in path.parents:
                    obs.record_security_violation("path_traversal")
                    raise DocumentError("bad_uri", "the store key leaves the document store")
                if not path.is_file():
                    raise DocumentError("not_found", f"no document {key!r} in the store")
                _copy_local(path, staged, doc.size_bytes, on_bytes)
            else:
                resumes = _download_http(doc.uri, staged, doc.size_bytes, on_bytes)
                span.set_attribute("cad.document.resumes", resumes)
            progress("download", 1.0)
            obs.record_document_load_stage("download", time.perf_counter() - started)
            checked = _verify(doc, staged, obs, progress)
            span.set_attribute("cad.document.size_bytes", checked)
            return cache.admit(staged, doc)
        finally:
            staged.unlink(missing_ok=True)
    progress("download", 1.0)
    _verify(doc, cached, obs, progress)  # a cached copy is checked again: the disk is not trusted either
    return cached


def _verify(doc: InputDocument, path: Path, obs: ModelObservability, progress: Callable[[str, float], None]) -> int:
    started = time.perf_counter()
    digest = _sha256(path)
    obs.record_document_load_stage("checksum", time.perf_counter() - started)
    if digest != doc.sha256:
        obs.record_security_violation("checksum_mismatch")
        log.error(
            "input document failed its checksum; the job is rejected before any engine opens it",
            extra={"security_event": True, "violation_type": "checksum_mismatch",
                   "severity": SECURITY_VIOLATION_SEVERITY["checksum_mismatch"],
                   "expected_sha256": doc.sha256, "actual_sha256": digest, "uri_scheme": doc.uri.split(":", 1)[0]},
        )  # fmt: skip
        path.unlink(missing_ok=True)  # never leave bad bytes where a later lookup could find them
        raise DocumentError("checksum_mismatch", "the document's sha256 does not match the job's")
    progress("checksum", 1.0)
    return path.stat().st_size
