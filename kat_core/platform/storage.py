"""Object storage: one `ObjectStore` for local paths and `s3://bucket/prefix` URIs (the S3 API through the
`minio` client, so MinIO, AWS S3, Ceph and moto all work).

A directory is stored as its files plus an index object, `.kat-index.json` (relative path -> sha256), written
last. The index is the commit marker: an upload interrupted half-way has no index, so nobody takes it for a
complete directory, and a download verifies every file against it before the directory appears under its
final name. Each object also carries its digest as `x-amz-meta-sha256`, so it can be checked on its own.

Configuration comes from the environment, as the S3 tools do it:
    endpoint     KAT_S3_ENDPOINT, else MLFLOW_S3_ENDPOINT_URL, else AWS_ENDPOINT_URL (default AWS S3);
                 `http://` or `https://` decides TLS
    credentials  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN); region AWS_DEFAULT_REGION
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from kat_core.data.dataset import swap_into_place
from kat_core.errors import KatError, NotFound
from kat_core.manifest import STORE_INDEX, sha256_file

log = logging.getLogger(__name__)

INDEX = STORE_INDEX
T = TypeVar("T")

# S3 error codes: the ones a retry can fix, and the ones that mean "your credentials are wrong"
_TRANSIENT = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed"}
_AUTH = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
         "AuthorizationHeaderMalformed", "InvalidClientTokenId"}


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b/` -> ("bucket", "a/b"); a KatError for anything without a bucket."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise KatError(f"not an s3:// URI: {uri!r} (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.strip("/")


def endpoint_from_env() -> str | None:
    for var in ("KAT_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


class ObjectStore:
    """Upload and download directories to local paths or `s3://` URIs, verified by sha256.

    `attempts` and `backoff_s` set the retries for transient failures (connection refused or reset, 5xx,
    SlowDown): attempt k waits backoff_s * 2**(k-1) first. Wrong credentials fail at once; an endpoint still
    down after the last attempt is one KatError naming it."""

    def __init__(
        self,
        endpoint: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        region: str | None = None,
        attempts: int = 4,
        backoff_s: float = 0.5,
        timeout_s: float = 10.0,
    ):
        self.endpoint = endpoint or endpoint_from_env() or "https://s3.amazonaws.com"
        if "://" not in self.endpoint:
            self.endpoint = "https://" + self.endpoint  # a bare host:port: TLS, as AWS tools assume
        self.access_key = access_key if access_key is not None else os.environ.get("AWS_ACCESS_KEY_ID")
        self.secret_key = secret_key if secret_key is not None else os.environ.get("AWS_SECRET_ACCESS_KEY")
        self.session_token = session_token or os.environ.get("AWS_SESSION_TOKEN")
        self.region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        self.attempts, self.backoff_s, self.timeout_s = max(1, attempts), backoff_s, timeout_s
        self._minio = None

    # ---- public API -------------------------------------------------------------------------------------

    def upload_dir(self, local: str | Path, uri: str | Path) -> dict[str, str]:
        """Copy the files under `local` to `uri` (an s3:// URI or a local path); returns the index
        (relative path -> sha256). Whatever was at `uri` before is replaced."""
        src = Path(local)
        if not src.is_dir():
            raise KatError(f"cannot upload {src}: not a directory")
        index = {
            p.relative_to(src).as_posix(): sha256_file(p)
            for p in sorted(src.rglob("*"))
            if p.is_file() and p.name != INDEX
        }
        if is_s3(uri):
            self._upload_s3(src, str(uri), index)
        else:
            self._copy_verified(src, Path(uri), index, where=str(src))
        log.info("uploaded %d files from %s to %s", len(index), src, uri)
        return index

    def download_dir(self, uri: str | Path, local: str | Path) -> Path:
        """Fetch the directory at `uri` into `local`, every file checked against the index; `local` appears
        only when all files arrived intact (a tampered or truncated object is a KatError naming it)."""
        dst = Path(local)
        if is_s3(uri):
            index = self.read_index(uri)
            bucket, prefix = split_s3(str(uri))
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                for rel, digest in index.items():
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    key = _key(prefix, rel)
                    self._call(f"download s3://{bucket}/{key}",
                               lambda k=key, t=target: self._client().fget_object(bucket, k, str(t)))
                    _check_digest(target, digest, f"s3://{bucket}/{key}")
                _write_index(tmp, index)
                swap_into_place(tmp, dst)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            src = Path(uri)
            self._copy_verified(src, dst, self.read_index(src), where=str(src))
        log.info("downloaded %s to %s (sha256 verified)", uri, dst)
        return dst

    def read_index(self, uri: str | Path) -> dict[str, str]:
        """The index of a stored directory; a KatError when there is none (nothing, or an unfinished upload)."""
        if is_s3(uri):
            bucket, prefix = split_s3(str(uri))
            key = _key(prefix, INDEX)
            try:
                text = self._call(f"read s3://{bucket}/{key}", lambda: self._get_bytes(bucket, key)).decode()
            except _NotFound:
                raise NotFound(f"no complete directory at {uri} (no {INDEX}; nothing uploaded or unfinished)") from None
        else:
            path = Path(uri) / INDEX
            if not path.is_file():
                raise NotFound(f"no complete directory at {uri} (no {INDEX})")
            text = path.read_text()
        try:
            index = dict(json.loads(text)["files"])
        except (ValueError, KeyError, TypeError) as e:
            raise KatError(f"unreadable {INDEX} at {uri}: {e}") from None
        # the index comes from the store, and whoever can write there chooses its names: each one becomes a path
        # under the destination (and, locally, under the source), so an absolute one or `..` must not pass
        for rel in index:
            if not _safe_rel(rel):
                raise KatError(f"{INDEX} at {uri} names an unsafe path {rel!r} (absolute or leaving the directory)")
        return index

    def exists(self, uri: str | Path) -> bool:
        """Whether a complete directory (one with an index) is stored at `uri`."""
        try:
            self.read_index(uri)
            return True
        except NotFound:
            return False

    # ---- S3 --------------------------------------------------------------------------------------------

    def _upload_s3(self, src: Path, uri: str, index: dict[str, str]) -> None:
        import io

        bucket, prefix = split_s3(uri)
        if not prefix:  # replacing "the directory" at a bucket root would delete everything else in it
            raise KatError(f"upload to a prefix inside the bucket, not its root: {uri} (e.g. s3://{bucket}/runs/x)")
        client = self._client()
        if not self._call(f"check bucket {bucket}", lambda: client.bucket_exists(bucket)):
            self._call(f"create bucket {bucket}", lambda: client.make_bucket(bucket))
        # drop the old index first: from here until the new one is written, the prefix reads as incomplete
        self._call(f"remove s3://{bucket}/{_key(prefix, INDEX)}",
                   lambda: client.remove_object(bucket, _key(prefix, INDEX)))
        for rel, digest in index.items():
            key = _key(prefix, rel)
            self._call(f"upload s3://{bucket}/{key}", lambda k=key, r=rel, d=digest: client.fput_object(
                bucket, k, str(src / r), metadata={"sha256": d}))
        # files left from an earlier upload under the same prefix would be stale: remove them
        wanted = {_key(prefix, rel) for rel in index} | {_key(prefix, INDEX)}
        listing = self._call(f"list s3://{bucket}/{prefix}", lambda: [
            o.object_name for o in client.list_objects(bucket, prefix=prefix + "/" if prefix else "", recursive=True)
        ])
        for key in set(listing) - wanted:
            self._call(f"remove s3://{bucket}/{key}", lambda k=key: client.remove_object(bucket, k))
        body = json.dumps({"files": index}, indent=1, sort_keys=True).encode()
        self._call(f"write s3://{bucket}/{_key(prefix, INDEX)}", lambda: client.put_object(
            bucket, _key(prefix, INDEX), io.BytesIO(body), len(body), content_type="application/json"))

    def _get_bytes(self, bucket: str, key: str) -> bytes:
        from minio.error import S3Error

        try:
            response = self._client().get_object(bucket, key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchBucket"):
                raise _NotFound(key) from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def _client(self):
        if self._minio is None:
            import urllib3
            from minio import Minio

            parsed = urlparse(self.endpoint)
            # our own retry loop below decides about retries and prints one error; urllib3's would retry
            # a refused connection silently for ~10 s
            http = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=self.timeout_s, read=max(60.0, self.timeout_s)),
                retries=False,
                maxsize=10,
            )
            self._minio = Minio(
                parsed.netloc,
                access_key=self.access_key or None,
                secret_key=self.secret_key if self.access_key else None,
                session_token=self.session_token,
                secure=parsed.scheme == "https",
                region=self.region,
                http_client=http,
            )
        return self._minio

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one S3 call with retries for transient failures; every other failure is one KatError line."""
        import urllib3
        from minio.error import InvalidResponseError, S3Error, ServerError

        last = ""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except _NotFound:
                raise
            except S3Error as e:
                if e.code in _AUTH:
                    raise KatError(
                        f"S3 at {self.endpoint} rejected the credentials ({e.code}: {e.message}) while trying to "
                        f"{what}; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                    ) from None
                if e.code not in _TRANSIENT:
                    raise KatError(f"S3 at {self.endpoint}: cannot {what}: {e.code}: {e.message}") from None
                last = f"{e.code}: {e.message}"
            except ServerError as e:
                last = f"HTTP {e.status_code}"
            except InvalidResponseError as e:  # not S3 XML: a proxy error page, or not an S3 endpoint at all
                raise KatError(f"{self.endpoint} did not answer like S3 while trying to {what}: "
                               f"{_first_line(str(e))}") from None
            except (urllib3.exceptions.HTTPError, OSError) as e:
                last = _reason(e)
            except ValueError as e:  # minio's own argument checks, e.g. an invalid bucket name
                raise KatError(f"cannot {what}: {e}") from None
            if attempt < self.attempts:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("S3 %s failed (%s); retry %d/%d in %.1fs", what, last, attempt, self.attempts - 1, delay)
                time.sleep(delay)
        raise KatError(f"S3 endpoint {self.endpoint} is unreachable or failing ({last}) after {self.attempts} "
                       f"attempts to {what}")

    # ---- local -----------------------------------------------------------------------------------------

    @staticmethod
    def _copy_verified(src: Path, dst: Path, index: dict[str, str], where: str) -> None:
        """Copy the indexed files of `src` into `dst` through a temp sibling, checking every digest."""
        if src.resolve() == dst.resolve():
            raise KatError(f"source and destination are the same directory: {src}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for rel, digest in index.items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(src / rel, target)
                except FileNotFoundError:
                    raise KatError(f"{where}: indexed file {rel} is missing") from None
                _check_digest(target, digest, f"{where}/{rel}")
            _write_index(tmp, index)
            swap_into_place(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class _NotFound(Exception):
    """An object that does not exist: not a failure to retry or report, the caller decides."""


def _safe_rel(rel: object) -> bool:
    """Whether an index entry is a plain relative path (what `upload_dir` writes): not absolute, no empty, `.`
    or `..` segment."""
    if not isinstance(rel, str) or not rel or rel.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _check_digest(path: Path, digest: str, where: str) -> None:
    actual = sha256_file(path)
    if actual != digest:
        raise KatError(f"sha256 mismatch for {where}: expected {digest[:12]}…, got {actual[:12]}… "
                       "(the stored object was changed or corrupted)")



def _write_index(directory: Path, index: dict[str, Any]) -> None:
    (directory / INDEX).write_text(json.dumps({"files": index}, indent=1, sort_keys=True) + "\n")


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:200] if text else ""


def _reason(e: BaseException) -> str:
    """The innermost cause of a urllib3 error, e.g. 'Connection refused' instead of a MaxRetryError essay."""
    inner = getattr(e, "reason", None) or e.__cause__ or e
    text = str(inner)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset"):
        if marker in text:
            return marker
    return f"{type(inner).__name__}: {_first_line(text)}"
