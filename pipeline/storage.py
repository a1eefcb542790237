"""Filesystems for every URI the pipeline reads or writes, and fail-fast access checks.

Local paths and ``file://`` URIs map to :class:`pyarrow.fs.LocalFileSystem`; ``s3://bucket/prefix`` maps to
:class:`pyarrow.fs.S3FileSystem`; any other scheme pyarrow knows (``gs://``, ``hdfs://``, ``abfs://``) goes through
:meth:`pyarrow.fs.FileSystem.from_uri`. The returned ``(fs, path)`` pair is what Ray Data's readers and writers take
(``filesystem=fs``, paths without a scheme).

Credentials are never passed explicitly: pyarrow's S3 client walks the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``~/.aws``, instance or pod identity). Keeping them out of the
filesystem object also keeps them out of every pickle Ray ships to its workers, and out of every error message here.
"""

from __future__ import annotations

import os
import posixpath
import re
import time
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

# pyarrow reads neither of these itself (the AWS SDK's AWS_ENDPOINT_URL support is not wired through), so we do.
ENDPOINT_ENV_VARS = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENV_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")

# Substrings of AWS SDK error text, lower-cased. Auth failures will not heal on retry; network ones might.
_AUTH_MARKERS = (
    "access_denied", "access denied", "accessdenied", "invalidaccesskeyid", "invalid_access_key_id",
    "signaturedoesnotmatch", "signature_does_not_match", "expiredtoken", "expired_token", "invalidtoken",
    "http response code 403", "forbidden", "unrecognized_client", "no credentials", "missing_authentication",
)
_BUCKET_MARKERS = ("no_such_bucket", "nosuchbucket", "bucket does not exist")
_NETWORK_MARKERS = (
    "network_connection", "could not connect", "couldn't connect", "connection refused", "timed out", "timeout",
    "could not resolve", "couldn't resolve", "name resolution", "slow_down", "service_unavailable",
    "internal_failure", "throttl", "curlcode", "connection reset",
)


# "scheme://user:password@host" anywhere in a text: the user-info part is what must never be shown.
# The password may hold "/" (AWS secret keys do), so after a ":" anything but space runs to the "@".
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@:]*(?::[^\s@]*)?@")


# A URL's query, where presigned URLs and SAS tokens carry their signature and credential (X-Amz-Signature, sig=).
_QUERY = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s'\"?]*)\?[^\s'\"]+")


def redact_userinfo(text: str) -> str:
    """``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket`` and ``https://host/k?X-Amz-Signature=...`` ->
    ``https://host/k?***``, in any text (URIs, SDK error messages)."""
    return _QUERY.sub(r"\1?***", _USERINFO.sub(r"\1***@", text))


class StorageError(RuntimeError):
    """A source or destination cannot be used; the message says which and why (never with credentials: any
    ``scheme://user:password@`` and any URL's query in it is masked, whoever built the message)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_userinfo(str(message)))


def _refuse_userinfo(uri: str, what: str) -> None:
    if "://" in uri and _USERINFO.match(uri):
        # the message must not echo the URI: it holds the credential
        raise StorageError(f"credentials inside the {what} are not supported (the value is not shown): use the "
                           "AWS credential chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or a role)")


def _endpoint_from_env() -> str | None:
    for name in ENDPOINT_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _split_endpoint(endpoint_url: str) -> tuple[str, str]:
    """'http://host:9000' -> ('host:9000', 'http'); a bare 'host:9000' is taken as https, the AWS default."""
    if "://" not in endpoint_url:
        if "@" in endpoint_url:
            _refuse_userinfo(f"https://{endpoint_url}", "endpoint URL")
        return endpoint_url.rstrip("/"), "https"
    _refuse_userinfo(endpoint_url, "endpoint URL")
    parsed = urlparse(endpoint_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise StorageError(f"S3 endpoint must look like http(s)://host[:port], got {endpoint_url!r}")
    return parsed.netloc, parsed.scheme


def _is_local(scheme: str) -> bool:
    # A one-letter "scheme" is a Windows drive letter, not a URI.
    return scheme in ("", "file", "local") or len(scheme) == 1


# Object stores whose URI is scheme://bucket/key: a key may hold "#" and "?" (the AWS CLI takes them literally), so
# these are split by hand, never by urlparse, which would cut the key there and read or write another prefix.
_BUCKET_SCHEMES = ("s3", "s3a", "gs", "gcs")
# Azure: abfs[s]://container@account.dfs.core.windows.net/path; there the "@" names the container, not a user.
_AZURE_SCHEMES = ("abfs", "abfss")
# Schemes whose filesystem takes the path alone, the host being the service (what pyarrow's from_uri returns).
_HOST_SCHEMES = ("hdfs", "viewfs")


def uri_path(uri_or_path: str) -> str:
    """The path a pyarrow filesystem expects for a URI, without building a client: ``s3://b/p/`` -> ``b/p``,
    ``hdfs://nn:8020/d`` -> ``/d``, ``abfs://c@acct.dfs.core.windows.net/p`` -> ``c/p``, a local path -> its
    absolute form."""
    if not uri_or_path:
        raise StorageError("empty path or URI")
    scheme, sep, rest = uri_or_path.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme not in _AZURE_SCHEMES:
        _refuse_userinfo(uri_or_path, "storage URI")
    if _is_local(scheme):
        path = uri_or_path
        if scheme in ("file", "local"):  # file:///a#b is the file "/a#b"; file://host/a is "/a"
            path = rest if rest.startswith("/") else "/" + rest.partition("/")[2]
        return os.path.abspath(os.path.expanduser(path))
    if scheme in _BUCKET_SCHEMES:
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StorageError(f"no bucket in {uri_or_path!r}: expected {scheme}://bucket/prefix")
        return f"{bucket}/{key.strip('/')}".rstrip("/")
    parsed = urlparse(uri_or_path)
    if not parsed.netloc:
        raise StorageError(f"no bucket or host in {uri_or_path!r}: expected {scheme}://bucket/prefix")
    if scheme in _HOST_SCHEMES:
        return parsed.path.rstrip("/") or "/"
    if scheme in _AZURE_SCHEMES and "@" in parsed.netloc:
        return f"{parsed.netloc.split('@', 1)[0]}/{parsed.path.strip('/')}".rstrip("/")
    return f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")


def resolve_filesystem(
    uri_or_path: str, endpoint_url: str | None = None, region: str | None = None
) -> tuple[pafs.FileSystem, str]:
    """Map a URI or local path to ``(pyarrow filesystem, path inside it)``.

    ``endpoint_url`` (or env ``S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) points S3 at a
    compatible server (MinIO, Ceph, moto); its scheme picks http or https. ``region`` falls back to
    ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, then ``us-east-1`` with a custom endpoint, else the bucket's own region.
    """
    path = uri_path(uri_or_path)
    scheme = uri_or_path.partition("://")[0].lower() if "://" in uri_or_path else ""
    if _is_local(scheme):
        return pafs.LocalFileSystem(), path
    if scheme in ("s3", "s3a"):
        return _s3_filesystem(path.split("/", 1)[0], endpoint_url, region), path
    try:
        fs, theirs = pafs.FileSystem.from_uri(uri_or_path)
        # a bucket store's key as written (from_uri cuts it at "#" or "?"); elsewhere the filesystem's own view
        return fs, path if scheme in _BUCKET_SCHEMES else theirs
    except (ValueError, TypeError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        # not chained: pyarrow's message repeats the URI unmasked, and a traceback would print it
        raise StorageError(f"unsupported URI {uri_or_path!r}: {e}") from None


def _s3_filesystem(bucket: str, endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    endpoint_url = endpoint_url or _endpoint_from_env()
    region = region or next((os.environ[v] for v in REGION_ENV_VARS if os.environ.get(v)), None)
    kwargs: dict = {}
    if endpoint_url:
        kwargs["endpoint_override"], kwargs["scheme"] = _split_endpoint(endpoint_url)
        # S3-compatible servers ignore the region but the request signer needs one.
        region = region or "us-east-1"
    elif region is None:
        try:
            # Without it the SDK assumes us-east-1 and every request to a bucket elsewhere is redirected or refused.
            region = pafs.resolve_s3_region(bucket)
        except (OSError, ValueError):
            region = None  # let check_readable report the real problem (no such bucket, no network)
    if region:
        kwargs["region"] = region
    # connect_timeout bounds each try against a black-holed endpoint; the retry strategy (SDK default: 3 tries)
    # smooths over throttling during the job itself.
    return pafs.S3FileSystem(connect_timeout=5.0, **kwargs)


def _endpoint(fs: pafs.FileSystem) -> str:
    """An S3 filesystem's endpoint (" at scheme://host"), "" for AWS itself or another kind of filesystem."""
    if fs.type_name != "s3":
        return ""
    try:
        options = fs.__reduce__()[1][0]
        if options.get("endpoint_override"):
            return f" at {options.get('scheme') or 'https'}://{options['endpoint_override']}"
    except Exception:  # noqa: BLE001 - only cosmetic; pyarrow may change its pickle layout
        pass
    return ""


def describe(fs: pafs.FileSystem, path: str) -> str:
    """A human-readable location for error messages: URI plus endpoint, never credentials."""
    if fs.type_name == "s3":
        return redact_userinfo(f"s3://{path}{_endpoint(fs)}")
    if fs.type_name == "local":
        return path
    return redact_userinfo(f"{fs.type_name}://{path}")


def overlap(fs_a: pafs.FileSystem, path_a: str, fs_b: pafs.FileSystem, path_b: str) -> bool:
    """Whether two locations on the same store are one and the same or one lies inside the other."""
    if fs_a.type_name != fs_b.type_name or _endpoint(fs_a) != _endpoint(fs_b):
        return False
    a, b = (posixpath.normpath(p).rstrip("/") for p in (path_a, path_b))
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _classify(err: BaseException) -> str:
    text = str(err).lower()
    if any(m in text for m in _AUTH_MARKERS):
        return "auth"
    if any(m in text for m in _BUCKET_MARKERS):
        return "bucket"
    if isinstance(err, (ConnectionError, TimeoutError)) or any(m in text for m in _NETWORK_MARKERS):
        return "network"
    return "other"


def _explain(kind: str, where: str, err: BaseException, attempts: int) -> str:
    if kind == "auth":
        return (
            f"access to {where} was refused: the credentials are missing, wrong or lack permission "
            "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE or the pod's "
            f"identity; values are not shown) [{_first_line(err)}]"
        )
    if kind == "bucket":
        return f"bucket of {where} does not exist (or is not visible with these credentials)"
    if kind == "network":
        return (
            f"cannot reach the storage endpoint for {where} after {attempts} attempt(s): check the endpoint URL "
            f"(source.endpoint_url / output.endpoint_url, or env S3_ENDPOINT_URL) and the network [{_first_line(err)}]"
        )
    return f"cannot access {where}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def _with_retries(fn, where: str, attempts: int, backoff_s: float):
    """Run ``fn`` retrying network-looking failures only, then raise one StorageError that says what went wrong."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except (OSError, ValueError) as e:
            kind = _classify(e)
            if kind == "network" and attempt < attempts:
                time.sleep(backoff_s * 2 ** (attempt - 1))
                continue
            raise StorageError(_explain(kind, where, e, attempt)) from e
    raise AssertionError("unreachable")


def _missing_message(fs: pafs.FileSystem, path: str, where: str, attempts: int, backoff_s: float) -> str:
    if fs.type_name == "s3":
        bucket = path.split("/", 1)[0]
        info = _with_retries(lambda: fs.get_file_info(bucket), where, attempts, backoff_s)
        if info.type == pafs.FileType.NotFound:
            return f"bucket {bucket!r} of {where} does not exist (or is not visible with these credentials)"
    return f"no such file or directory: {where}"


def check_readable(
    fs: pafs.FileSystem, path: str, *, attempts: int = 3, backoff_s: float = 0.5
) -> pafs.FileInfo:
    """Fail fast, before any Ray work, when ``path`` cannot be read; return its FileInfo (a file or a directory).

    Raises StorageError naming the location and the cause: missing bucket, missing path, refused credentials or
    an unreachable endpoint (retried ``attempts`` times with exponential backoff first).
    """
    where = describe(fs, path)
    info = _with_retries(lambda: fs.get_file_info(path), where, attempts, backoff_s)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(_missing_message(fs, path, where, attempts, backoff_s))
    if info.type == pafs.FileType.Directory:
        # A HEAD on an S3 "directory" can succeed without list permission; listing is what the readers do.
        _with_retries(
            lambda: fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=False)),
            where, attempts, backoff_s,
        )
    return info


def check_writable(fs: pafs.FileSystem, path: str, *, attempts: int = 3, backoff_s: float = 0.5) -> None:
    """Fail fast when ``path`` (an output directory) cannot be written: write and delete a small probe object.

    The probe's name starts with ``_`` so that Ray's readers skip it should the delete ever fail.
    """
    where = describe(fs, path)
    info = _with_retries(lambda: fs.get_file_info(path), where, attempts, backoff_s)
    if info.type == pafs.FileType.File:
        raise StorageError(f"output {where} is an existing file, expected a directory")
    if fs.type_name == "s3":
        bucket = path.split("/", 1)[0]
        binfo = _with_retries(lambda: fs.get_file_info(bucket), where, attempts, backoff_s)
        if binfo.type == pafs.FileType.NotFound:
            # S3FileSystem would refuse to create it anyway (allow_bucket_creation=False): say so plainly.
            raise StorageError(f"bucket {bucket!r} of {where} does not exist; create it first")
    probe = f"{path.rstrip('/')}/_bbpurify_write_probe-{uuid.uuid4().hex}"

    def write_and_delete() -> None:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)

    _with_retries(write_and_delete, where, attempts, backoff_s)
