"""Input documents for the upload flow: fetched, verified, cached, before any engine runs.

Order of events for a job with ``input``:

1. ``download``: from the cache when a verified copy with that sha256 is there
   (hit), else from the artifact store: ``store://key`` is a file under the
   worker's document store directory; ``http(s)://`` is fetched with ranged
   requests, resuming where a dropped connection left off, within the job's
   deadline and never past the job's ``size_bytes`` (or the download bound).

   An HTTP(S) URL is fetched only from a public address: the host name is
   resolved, every address it resolves to must be globally routable (no
   loopback, private, link-local, unique-local, cloud metadata, IPv4-mapped or
   otherwise embedded internal address), the connection goes to the very
   address that was checked (no second lookup an attacker's DNS could answer
   differently), and each redirect is checked the same way. URLs with
   credentials are refused. Operators whose document store is internal allow
   it by network or host name (``CADSCOPE_DOCUMENT_ALLOW``). What a client is
   told never describes the remote (its status, size or reachability): that
   goes to the worker's log.
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
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from opentelemetry import trace

from ..metrics import SECURITY_VIOLATION_SEVERITY, ModelObservability
from ._schema import InputDocument

__all__ = ["DocumentCache", "DocumentError", "FetchPolicy", "fetch_document"]

log = logging.getLogger("cadscope.documents")
CHUNK = 1 << 20
SUFFIX = {"step": ".step", "brep": ".brep", "fcstd": ".FCStd", "py": ".py"}


class DocumentError(Exception):
    """The input document cannot be used; ``error_type`` is the metric label, ``violation`` the
    security violation it is, if any (counted in ``cadscope_security_violations_total``)."""

    def __init__(self, error_type: str, message: str, *, violation: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.violation = violation


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


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REFUSED = "the document's URL is not allowed (its host is not a public address; see CADSCOPE_DOCUMENT_ALLOW)"
_UNAVAILABLE = "the document could not be downloaded"


def _embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]
        if address in _NAT64:
            return ipaddress.IPv4Address(address.packed[-4:])
    return address


@dataclass(frozen=True)
class FetchPolicy:
    """Where HTTP(S) documents may come from. By default only public addresses;
    ``allowed_networks`` and ``allowed_hosts`` open internal ones an operator chose."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    max_redirects: int = 3

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FetchPolicy:
        """``CADSCOPE_DOCUMENT_ALLOW``: comma-separated networks (``10.20.0.0/16``,
        ``127.0.0.1/32``) and host names (``store.internal``), allowed though not public."""
        env = os.environ if env is None else env
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for item in (x.strip() for x in env.get("CADSCOPE_DOCUMENT_ALLOW", "").split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                if "/" in item or not item.replace("-", "").replace(".", "").isalnum():
                    raise ValueError(
                        f"CADSCOPE_DOCUMENT_ALLOW: {item!r} is neither a network nor a host name"
                    ) from None
                hosts.add(item.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def allows(self, address: IPAddress) -> bool:
        inner = _embedded_ipv4(address)
        if any(a in n for a in (address, inner) for n in self.allowed_networks if a.version == n.version):
            return True
        return address.is_global and inner.is_global and not (address.is_multicast or inner.is_multicast)

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address ``host`` resolves to, all of them allowed, or :class:`DocumentError`."""
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            log.warning("document host does not resolve", extra={"error": type(exc).__name__})
            raise DocumentError("download_failed", _UNAVAILABLE) from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found))
        if host.lower().rstrip(".") in self.allowed_hosts:
            return addresses
        refused = [a for a in addresses if not self.allows(a)]
        if refused or not addresses:
            log.error(
                "document URL refused: its host resolves to an address that is not public",
                extra={"security_event": True, "violation_type": "forbidden_address",
                       "addresses": [str(a) for a in refused][:4]},
            )  # fmt: skip
            raise DocumentError("bad_uri", _REFUSED, violation="forbidden_address")
        return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever the host name resolves to now."""

    def __init__(self, host: str, port: int, address: IPAddress, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.pinned = address
        # Kept after http.client hands the socket to a response that will close it: each
        # read's timeout is set on it (what is left of the deadline).
        self.raw: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.raw = socket.create_connection((str(self.pinned), self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: IPAddress, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.pinned, self.tls = address, context
        self.raw: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.create_connection((str(self.pinned), self.port), self.timeout)
        self.sock = self.raw = self.tls.wrap_socket(sock, server_hostname=self.host)  # the certificate names the host


class _Deadline:
    def __init__(self, at: float | None, timeout_s: float) -> None:
        self.at, self.timeout_s = at, timeout_s

    def left(self) -> float:
        """Seconds for the next network operation: the per-operation timeout, or what is
        left of the job's deadline if that is sooner."""
        if self.at is None:
            return self.timeout_s
        left = self.at - time.monotonic()
        if left <= 0:
            raise DocumentError("download_timeout", "the document did not arrive within the job's time limit")
        return min(self.timeout_s, left)


def _copy_local(
    source: Path, dest: Path, expected: int | None, on_bytes: Callable[[int, int | None], None], deadline: _Deadline
) -> None:
    size = source.stat().st_size
    if expected is not None and size != expected:
        # Not the file's size: a client must not learn the size of files in the store.
        raise DocumentError("size_mismatch", "the document's size does not match the job's size_bytes")
    done = 0
    with source.open("rb") as src, dest.open("wb") as out:
        while chunk := src.read(CHUNK):
            deadline.left()
            out.write(chunk)
            done += len(chunk)
            on_bytes(done, size)


def _open(
    url: str, headers: dict[str, str], policy: FetchPolicy, deadline: _Deadline
) -> tuple[_PinnedHTTPConnection | _PinnedHTTPSConnection, http.client.HTTPResponse]:
    """GET ``url`` from a checked address, following redirects only to checked addresses."""
    for _ in range(policy.max_redirects + 1):
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise DocumentError("bad_uri", "the document's URL is not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DocumentError("bad_uri", "the document's URL must be http:// or https:// with a host")
        if parts.username is not None or parts.password is not None:
            raise DocumentError("bad_uri", "the document's URL must not carry credentials")
        addresses = policy.resolve(parts.hostname, port)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection: _PinnedHTTPConnection | _PinnedHTTPSConnection
        for index, address in enumerate(addresses):
            if parts.scheme == "https":
                connection = _PinnedHTTPSConnection(parts.hostname, port, address, deadline.left(),
                                                    ssl.create_default_context())  # fmt: skip
            else:
                connection = _PinnedHTTPConnection(parts.hostname, port, address, deadline.left())
            try:
                connection.request("GET", path, headers={**headers, "Accept-Encoding": "identity"})
                response = connection.getresponse()
                break
            except OSError:
                connection.close()
                if index == len(addresses) - 1:
                    raise
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            url = urljoin(url, response.getheader("Location", ""))
            response.close()
            connection.close()
            continue
        return connection, response
    log.warning("document download gave up after redirects", extra={"redirects": policy.max_redirects})
    raise DocumentError("download_failed", _UNAVAILABLE)


def _download_http(
    url: str, dest: Path, expected: int | None, on_bytes: Callable[[int, int | None], None], *,
    policy: FetchPolicy, deadline: _Deadline, max_resumes: int = 5, max_bytes: int = 512 << 20,
) -> int:  # fmt: skip
    """Ranged, resumable GET: after a dropped connection, ask for ``bytes=<have>-``.
    Reading stops at the declared size (else ``max_bytes``) and at the deadline.
    Returns the number of resumes it took."""
    limit = expected if expected is not None else max_bytes
    too_large = (
        DocumentError("size_mismatch", "the document is larger than the job's size_bytes")
        if expected is not None
        else DocumentError("too_large", f"the document is larger than {max_bytes} bytes")
    )
    resumes = 0
    total = expected
    while True:
        have = dest.stat().st_size
        headers = {"User-Agent": "cadscope", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            connection, response = _open(url, headers, policy, deadline)
            try:
                if response.status == 416 and total is not None and have >= total:
                    return resumes
                if response.status not in (200, 206):
                    log.warning("document download refused by its server", extra={"status": response.status})
                    raise DocumentError("download_failed", _UNAVAILABLE)
                if have and response.status != 206:
                    have = 0  # the server ignored the range: start over
                    dest.write_bytes(b"")
                length = response.getheader("Content-Length", "")
                announced = have + int(length) if length.isdigit() else None
                if announced is not None and announced > limit:
                    raise too_large  # before reading a byte of it
                if total is None and announced is not None:
                    total = announced
                with dest.open("ab") as out:
                    while True:
                        if connection.raw is not None:
                            connection.raw.settimeout(deadline.left())
                        chunk = response.read1(min(CHUNK, limit - have + 1))
                        if not chunk:
                            break
                        have += len(chunk)
                        if have > limit:
                            raise too_large
                        out.write(chunk)
                        on_bytes(have, total)
                deadline.left()
            finally:
                response.close()  # the response owns the socket once the server said it will close it
                connection.close()
            if total is None or have >= total:
                if expected is not None and have != expected:
                    raise DocumentError("size_mismatch", "the document's size does not match the job's size_bytes")
                return resumes
        except DocumentError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            deadline.left()  # a timeout past the deadline is the deadline's
            log.warning("document download interrupted; resuming", extra={"have": have, "error": type(exc).__name__})
        resumes += 1
        if resumes > max_resumes:
            raise DocumentError("download_failed", _UNAVAILABLE)
        time.sleep(min(0.2 * resumes, 2.0, deadline.left()))


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
    deadline: float | None = None,
    policy: FetchPolicy | None = None,
    timeout_s: float = 30.0,
) -> Path:
    """A verified local copy of ``doc``, or :class:`DocumentError`.

    ``deadline`` (a :func:`time.monotonic` time, the job's) bounds the whole
    download; ``timeout_s`` each network operation. ``policy`` defaults to
    :meth:`FetchPolicy.from_env`."""
    limits = _Deadline(deadline, timeout_s)
    policy = policy if policy is not None else FetchPolicy.from_env()
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
            path = _fetch(doc, source, cache, store_root, obs, progress, span, policy, limits)
        except DocumentError as exc:
            obs.record_document_load_failure(source, exc.error_type)
            if exc.violation is not None:
                obs.record_security_violation(exc.violation)
            span.set_attribute("error.type", exc.error_type)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
            raise
        finally:
            entries = cache.entries()
            obs.set_document_cache(len(entries), sum(e.st_size for e in entries))
        return path


def _fetch(
    doc: InputDocument, source: str, cache: DocumentCache, store_root: Path, obs: ModelObservability,
    progress: Callable[[str, float], None], span: trace.Span, policy: FetchPolicy, deadline: _Deadline,
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
                _copy_local(path, staged, doc.size_bytes, on_bytes, deadline)
            else:
                resumes = _download_http(doc.uri, staged, doc.size_bytes, on_bytes, policy=policy, deadline=deadline)
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
