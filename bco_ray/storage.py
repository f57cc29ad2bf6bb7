"""Local paths and s3:// URIs as one (pyarrow filesystem, path) pair.

pyarrow's native S3 client is used (it is what Ray Data's readers and writers use best);
endpoint, region and credentials come from `StorageConfig`, else from the usual AWS
environment variables and credential chain. Filesystems pickle, so Ray tasks get them.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import os
import posixpath
import shutil
import sys
from urllib.parse import urlparse

import pyarrow.fs as pafs

from bco_ray.config import Config, StorageConfig
from bco_ray.errors import UserError


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def filesystem(uri: str, cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    parsed = urlparse(uri)
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {}
    if endpoint:
        ep = urlparse(endpoint)
        kwargs["endpoint_override"] = ep.netloc or ep.path
        kwargs["scheme"] = ep.scheme or "https"
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if cfg.anonymous:
        kwargs["anonymous"] = True
    elif cfg.access_key_id:
        kwargs["access_key"] = cfg.access_key_id
        kwargs["secret_key"] = cfg.secret_access_key
    return pafs.S3FileSystem(**kwargs), (parsed.netloc + parsed.path).rstrip("/")


CREDENTIAL_ENV = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY"}


def credentials_to_environment(cfg: Config) -> Config:
    """Storage keys given in the config, moved to this process's environment and out of the
    config, so that no task argument, pickled filesystem or deployment argument carries them.

    Workers read credentials from their environment (the AWS chain). A local cluster started
    after this call inherits it; the workers of a cluster that is joined, or already running,
    do not, and a config key there is refused unless this environment already holds it."""
    sc = cfg.storage
    given = {env: getattr(sc, name) for name, env in CREDENTIAL_ENV.items() if getattr(sc, name)}
    if not given:
        return cfg
    if len(given) == 1:
        raise UserError("storage.access_key_id and storage.secret_access_key go together; only one is set",
                        "set both, or neither and use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an IAM role")
    from bco_ray.raycluster import joins_cluster

    ray = sys.modules.get("ray")  # not imported here: importing Ray has to wait for loopback_env
    if any(os.environ.get(env) != v for env, v in given.items()):
        if (ray is not None and ray.is_initialized()) or joins_cluster(cfg.ray):
            raise UserError("storage keys given in the config reach only the workers of a local cluster that "
                            "bco-ray starts; this run joins a cluster whose workers cannot get them",
                            "give the cluster's nodes the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                            "from a Kubernetes secret, or an IAM role), or `bco-ray submit --env ...`")
        os.environ.update(given)
        os.environ.pop("AWS_SESSION_TOKEN", None)  # a token belongs to the keys it came with, not these
    return dataclasses.replace(cfg, storage=dataclasses.replace(sc, access_key_id=None, secret_access_key=None))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def explain(e: OSError, where: str) -> UserError | None:
    """A storage error a user can fix (credentials, bucket, endpoint) as a UserError; None
    for anything else. pyarrow's S3 errors carry the AWS error name in their text."""
    msg = str(e)
    if any(s in msg for s in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "HTTP status 403")):
        return UserError(f"S3 refused access to {where} (wrong or missing credentials, or no permission)",
                         "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or storage.access_key_id / "
                         "storage.secret_access_key), storage.endpoint_url and the bucket's policy")
    if "NO_SUCH_BUCKET" in msg or "NoSuchBucket" in msg:
        return UserError(f"the bucket of {where} does not exist",
                         "check the bucket name, and storage.endpoint_url / storage.region")
    if "NETWORK_CONNECTION" in msg or "curlCode" in msg:
        return UserError(f"cannot reach the S3 endpoint for {where}",
                         "check storage.endpoint_url (or AWS_ENDPOINT_URL) and that the endpoint is up")
    return None


def parallel_map(fn, items, threads: int = 16):
    """fn(item) for each item, yielded in order, `threads` calls at a time: for calls bound by
    storage latency (parquet footers, small files). At most 4 x threads results are held ahead
    of the consumer; an exception is raised when its item's turn comes."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        ahead: list = []
        for item in items:
            ahead.append(pool.submit(fn, item))
            if len(ahead) >= 4 * threads:
                yield ahead.pop(0).result()
        for f in ahead:
            yield f.result()


def list_parquet(fs: pafs.FileSystem, path: str) -> list[str]:
    """Parquet files under a file, directory (recursive) or glob, sorted for determinism.
    A path that does not exist is a FileNotFoundError; S3 refusals are UserErrors."""
    try:
        return _list_parquet(fs, path)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise (explain(e, path) or e) from e


def _list_parquet(fs: pafs.FileSystem, path: str) -> list[str]:
    has_glob = any(ch in path for ch in "*?[")
    base = path
    if has_glob:
        base = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        if isinstance(fs, pafs.S3FileSystem) and fs.get_file_info(base.split("/")[0]).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such input: {path} (its bucket {base.split('/')[0]!r} does not exist)")
        raise FileNotFoundError(f"no such input: {path}")
    if info.type == pafs.FileType.File:
        return [base]
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
             and not any(part.startswith(("_", ".")) for part in i.path[len(base):].split("/"))]
    if has_glob:
        files = [f for f in files if fnmatch.fnmatch(f, path)]
    return sorted(files)


def partition_value(path: str, key: str) -> str | None:
    """The value of a hive partition `key=value` in a file path, if any."""
    for part in path.split("/"):
        if part.startswith(key + "="):
            return part[len(key) + 1:]
    return None


def move_files(src: str, names: list[str], fs: pafs.FileSystem, dest: str) -> None:
    """Move the files `names` (relative paths) of the local directory `src` into `dest`, in that
    order, then remove `src`. A local `dest` gets them by rename (copied only across devices):
    a model or checkpoint written beside its destination is written once, not twice."""
    if not isinstance(fs, pafs.LocalFileSystem):
        local = pafs.LocalFileSystem()
        fs.create_dir(dest, recursive=True)
        for name in names:
            pafs.copy_files(os.path.join(src, name), join(dest, name), source_filesystem=local,
                            destination_filesystem=fs)
        shutil.rmtree(src)
        return
    for name in names:
        a, b = os.path.join(src, name), os.path.join(dest, name)
        os.makedirs(os.path.dirname(b), exist_ok=True)
        try:
            os.replace(a, b)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.copyfile(a, b)
    shutil.rmtree(src)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_parquet_atomic(fs: pafs.FileSystem, folder: str, name: str, table) -> None:
    """`table` as `folder/name`, committed whole or not at all: a crash mid-write must not
    leave a truncated parquet file that every later reader then fails on. Locally a hidden
    temp file renamed into place (readers skip dot-files); on S3 one upload, which becomes
    visible only once complete."""
    import uuid

    import pyarrow.parquet as pq

    fs.create_dir(folder, recursive=True)
    if isinstance(fs, pafs.S3FileSystem):
        with fs.open_output_stream(join(folder, name)) as f:
            pq.write_table(table, f)
        return
    temp = join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    with fs.open_output_stream(temp) as f:
        pq.write_table(table, f)
    fs.move(temp, join(folder, name))  # a rename: atomic on one filesystem


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def listing(fs: pafs.FileSystem, path: str) -> list[tuple[str, int]]:
    """(name relative to `path`, size) of every parquet file under it: the identity of an
    input for skip-if-unchanged keys. Relative names: the same files unpacked elsewhere (a
    job's working_dir) are the same input."""
    files = list_parquet(fs, path)
    return [(f[len(path):], i.size) for f, i in zip(files, fs.get_file_info(files), strict=True)]


def read_parquet(path: str | list[str], fs: pafs.FileSystem, num_cpus: float, columns: list[str] | None = None):
    """Ray Data's parquet reader with every task of it at `num_cpus` CPUs.

    Ray 2.60's default reader (datasource V2) lists the files in a task of one whole CPU that
    no argument changes. Once fractional actors (scorers, embedders, training workers) sit on
    every node, no node has a whole CPU free and the read waits forever (seen on a cluster of
    two 1-CPU nodes with a 0.25-CPU scorer on each). The V1 reader has no listing task and its
    read tasks take `num_cpus`; which reader to build is read from the context at this call.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    was, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(path, filesystem=fs, num_cpus=num_cpus)
    finally:
        ctx.use_datasource_v2 = was
    return ds.select_columns(columns) if columns else ds


SORT_PIECE_ROWS = 1000  # rows of one (input block, output block) piece of the sort shuffle, at least


def shuffle_partitions(rows: int, strategy: str) -> int:
    """Partitions of a shuffle by key (dedup, UDM's distinct prompts) of about `rows` rows.

    The sort shuffle's map tasks return one piece per (input, output) partition pair, owned
    by the driver, and Ray keeps a returned object under 100 KB in its owner's memory: with
    pieces of a few rows the whole log came to rest in the driver (2.2 GB at 1e6 rows with
    245 x 245 pieces). So partitions stay at sqrt(rows / 1,000): pieces of >= 1,000 rows
    (~1 MB) go to the object store, 1e4 pieces at 1e7 rows; capped at 200 (blocks of 5e5 rows
    at 1e8, where the hash shuffle is the better choice).
    The hash shuffle's aggregators take any number, and its partitions grow so one stays under
    ~125k rows (about 250 MB at 2 KB a row): 200 at 1e7 rows, 800 at 1e8."""
    import math

    if strategy == "sort":
        return min(200, max(1, math.isqrt(rows // SORT_PIECE_ROWS)))
    return min(max(1, rows // 20_000), max(200, rows // 125_000))


def co_locate(ds, key: str, rows: int, strategy: str):
    """`ds` shuffled so that every block holds all the rows of each of its keys (`rows`: about
    how many it has; `strategy`: IngestConfig.shuffle).

    Ray's sort takes as many outputs as it has input blocks, so the blocks are first split and
    combined (no shuffle) to `shuffle_partitions`. A streaming repartition by rows per block
    does not do it: it splits large blocks but leaves each task's small ones (1e6 rows read as
    208 blocks, 43k pieces of ~23 rows, and the driver +757 MB; merged to 31 blocks, +35 MB)."""
    partitions = shuffle_partitions(rows, strategy)
    if strategy == "hash":
        return ds.repartition(partitions, keys=[key])
    return ds.repartition(partitions).sort(key)


def _count_block(table, columns: list[str]):
    return table.group_by(columns, use_threads=False).aggregate([([], "count_all")])


def count_by(ds, columns: list[str], num_cpus: float) -> dict[tuple, int]:
    """{key tuple: rows} of a Ray dataset, for a few distinct keys (splits, labels, reasons).

    Counted per block in map tasks of `num_cpus` and summed on the driver: one streaming
    pass and no shuffle. Ray 2.60's `groupby(...).count()` hash-shuffles into 200 partitions
    whatever the data's size (DataContext.default_hash_shuffle_parallelism): seconds of task
    overhead on a small log, an all-to-all exchange on a large one, for a handful of numbers.
    """
    out: dict[tuple, int] = {}
    partial = ds.map_batches(_count_block, fn_kwargs={"columns": columns}, batch_size=None,
                             batch_format="pyarrow", num_cpus=num_cpus)
    for r in partial.iter_rows():
        key = tuple(r[c] for c in columns)
        out[key] = out.get(key, 0) + int(r["count_all"])
    return out
