"""Where data bytes come from: local paths, ``s3://`` objects, ``http(s)://`` URLs, lhotse ``pipe:`` commands.

Three things the data layer needs from storage, with the same behaviour for every kind:

* :func:`exists` and :func:`list_names` (what a Shar directory holds);
* :func:`open_text` (a whole manifest, through lhotse's ``open_best``, which reads URLs with
  ``smart_open`` and runs ``pipe:`` commands);
* :func:`read_range` (one item's audio: exactly ``size`` bytes at ``offset``, one ranged request).

Credentials come only from the environment or the standard chain, never from a config: S3 through
boto3 (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role;
``AWS_ENDPOINT_URL`` for an S3-compatible store such as MinIO or AIStore's S3 API), HTTP without
any. Errors are :class:`RemoteError` with one line naming the URL, never a key or a signed
query string (:func:`redact`). Transient failures (connection resets, timeouts, HTTP 5xx/429) are
retried ``RETRIES`` times with exponential backoff; a request never waits longer than
``TIMEOUT_S`` for the server, so nothing hangs on a dead endpoint.

``BYTES_READ`` counts the bytes :func:`read_range` returned in this process (benchmarks).

Usage::

    data = read_range("s3://corpus/shar/recording.000003.tar", offset=10752, size=48213)
    names = list_names("s3://corpus/shar")       # ['cuts.000000.jsonl.gz', 'recording.000000.tar', ...]
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

RETRIES = 3  # after the first try: 4 tries in all, waiting 0.5, 1 and 2 s between them
TIMEOUT_S = (10.0, 60.0)  # (connect, read) per request
BYTES_READ = {"count": 0}


class RemoteError(OSError):
    """Storage that cannot be read; the message names the URL (without secrets) and why."""


def is_remote(path) -> bool:
    return isinstance(path, str) and (path.startswith(("s3://", "http://", "https://", "pipe:")))


def is_pipe(path) -> bool:
    return isinstance(path, str) and path.startswith("pipe:")


def redact(url: str) -> str:
    """``url`` for a message: no user:password, no query string (presigned URLs carry keys there)."""
    if is_pipe(url) or not is_remote(url):
        return str(url)
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_remote(base) else str(Path(base) / name)


def open_text(path: str):
    """A text stream of a manifest anywhere lhotse can read it (``.gz`` decompressed)."""
    from lhotse.serialization import open_best

    try:
        return open_best(path, "r")
    except FileNotFoundError:
        raise RemoteError(f"cannot read {redact(path)}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - whatever the transport raised, one line naming the place
        # lhotse re-raises a transport error as a generic ValueError: the cause is the one to name.
        cause = exc.__context__ if isinstance(exc, ValueError) and exc.__context__ is not None else exc
        raise RemoteError(f"cannot read {redact(path)}: {_reason(cause)}") from None


# --- S3 ----------------------------------------------------------------------------------------------

_S3 = {}


def _s3():
    """One boto3 client per process (DataLoader workers are forked: a client is not fork-safe)."""
    client = _S3.get(os.getpid())
    if client is None:
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", config=Config(connect_timeout=TIMEOUT_S[0], read_timeout=TIMEOUT_S[1],
                                                  retries={"max_attempts": RETRIES + 1, "mode": "standard"}))
        _S3[os.getpid()] = client
    return client


def _bucket_key(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc, parts.path.lstrip("/")


def _reason(exc: BaseException) -> str:
    """Why a request failed, in words, without the request's headers or signature."""
    code = getattr(exc, "response", None)
    if isinstance(code, dict):  # botocore ClientError
        err = code.get("Error", {})
        status = code.get("ResponseMetadata", {}).get("HTTPStatusCode")
        name = err.get("Code", "?")
        hint = {"403": "access denied: check the credentials in the environment (AWS_ACCESS_KEY_ID, "
                       "AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the bucket policy",
                "InvalidAccessKeyId": "the access key in the environment is not known to this store",
                "SignatureDoesNotMatch": "the secret key in the environment does not match its access key",
                "NoSuchBucket": "no such bucket", "NoSuchKey": "no such object", "404": "no such object"}
        return f"{status} {name}: {hint.get(name) or hint.get(str(status)) or err.get('Message', '')}".strip()
    if type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ConnectTimeout"):
        return f"cannot reach the endpoint ({type(exc).__name__}); check AWS_ENDPOINT_URL / the URL and the network"
    if type(exc).__name__ in ("ReadTimeoutError", "ReadTimeout", "Timeout"):
        return f"no answer within {TIMEOUT_S[1]:.0f} s ({type(exc).__name__})"
    if type(exc).__name__ == "NoCredentialsError":
        return "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _transient(exc: BaseException) -> bool:
    status = getattr(exc, "status", None)
    if status is not None:
        return status >= 500 or status == 429
    return isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in (
        "ConnectionError", "ConnectTimeout", "ReadTimeout", "ChunkedEncodingError")


class _HTTPStatus(OSError):
    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status} {reason}")
        self.status = status


def _retrying(url: str, what: str, fn):
    """``fn()`` with bounded retries of transient errors; a RemoteError naming ``url`` otherwise."""
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except RemoteError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt < RETRIES and _transient(exc):
                time.sleep(0.5 * 2**attempt)
                continue
            tries = f" (after {attempt + 1} tries)" if attempt else ""
            raise RemoteError(f"cannot {what} {redact(url)}: {_reason(exc)}{tries}") from None


_HTTP = {}


def _http_get(url: str, headers: dict | None = None, method: str = "GET"):
    session = _HTTP.get(os.getpid())
    if session is None:  # one per process, as the S3 client: connections are kept alive between items
        import requests

        session = _HTTP[os.getpid()] = requests.Session()
    response = session.request(method, url, headers=headers or {}, timeout=TIMEOUT_S)
    if response.status_code >= 400:
        raise _HTTPStatus(response.status_code, response.reason or "")
    return response


# --- what the data layer calls -----------------------------------------------------------------------

def exists(path: str) -> bool:
    if is_pipe(path):
        return True  # a command: known only when it runs
    if not is_remote(path):
        return Path(path).exists()
    if path.startswith("s3://"):
        bucket, key = _bucket_key(path)

        def head():
            try:
                _s3().head_object(Bucket=bucket, Key=key)
                return True
            except Exception as exc:  # noqa: BLE001
                status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404:  # maybe a "directory": a prefix with objects under it
                    listed = _s3().list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
                    return listed.get("KeyCount", 0) > 0
                raise

        return _retrying(path, "look up", head)

    def probe():
        try:
            _http_get(path, method="HEAD")
            return True
        except _HTTPStatus as exc:
            if exc.status == 404:
                return False
            raise

    return _retrying(path, "look up", probe)


def list_names(directory: str) -> list[str]:
    """File names directly in ``directory`` (a local folder or an ``s3://`` prefix), sorted."""
    if not is_remote(directory):
        return sorted(p.name for p in Path(directory).iterdir())
    if not directory.startswith("s3://"):
        raise RemoteError(f"cannot list {redact(directory)}: only local folders and s3:// prefixes can be listed")
    bucket, prefix = _bucket_key(directory)
    prefix = prefix.rstrip("/") + "/" if prefix else ""

    def listing():
        names, token = [], None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", **({"ContinuationToken": token} if token else {})}
            page = _s3().list_objects_v2(**kwargs)
            names += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(names)
            token = page["NextContinuationToken"]

    return _retrying(directory, "list", listing)


def read_range(path: str, offset: int, size: int) -> bytes:
    """Exactly ``size`` bytes of ``path`` from ``offset``, in one ranged request (RemoteError if
    the object is shorter: a truncated file is an error, not short audio)."""
    if size <= 0:
        return b""
    if not is_remote(path):
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    elif is_pipe(path):
        raise RemoteError(f"cannot read a byte range of {path}: a pipe: command streams its output whole")
    else:
        span = f"bytes={offset}-{offset + size - 1}"
        if path.startswith("s3://"):
            bucket, key = _bucket_key(path)
            data = _retrying(path, "read", lambda: _s3().get_object(Bucket=bucket, Key=key, Range=span)["Body"].read())
        else:
            response = _retrying(path, "read", lambda: _http_get(path, {"Range": span}))
            if response.status_code != 206:  # the whole file came back: that would be every item's read
                raise RemoteError(f"cannot read a byte range of {redact(path)}: the server ignores Range requests "
                                  f"(HTTP {response.status_code}); serve the Shar tars from one that answers 206")
            data = response.content
    BYTES_READ["count"] += len(data)
    if len(data) != size:
        raise RemoteError(f"{redact(path)} is truncated: {len(data)} of {size} bytes at offset {offset}")
    return data
