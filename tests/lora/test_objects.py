"""Adapter folders fetched from an object store: a real S3 API (moto's server on 127.0.0.1) and file:// URLs."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import moto.server as moto_server
import pytest

from governor.errors import AdapterNotFound, InvalidRequest, PayloadTooLarge
from governor.lora.objects import ObjectFetcher, _write_bounded, is_object_url
from tests.lora.factory import AdapterFactory

CONFIG, WEIGHTS, PROFILE = "adapter_config.json", "adapter_model.safetensors", "governor.json"
MEMBERS = ((CONFIG, 1 << 20, True), (WEIGHTS, 64 << 20, True), (PROFILE, 65536, False))
_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """moto's S3 server on a free local port, reached through boto3's standard chain (env vars only)."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        # Not the developer's ~/.aws: nothing there may steer these tests to a real account.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    try:
        yield boto3.client("s3")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"adapters-{os.getpid()}-{next(_buckets)}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def gets() -> Iterator[list[str]]:
    """The keys of every GetObject sent by clients made after this point (boto3's default session)."""
    keys: list[str] = []
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register(
        "before-call.s3.GetObject", lambda params, **_: keys.append(params["url_path"])
    )
    try:
        yield keys
    finally:
        boto3.DEFAULT_SESSION = None


def upload(s3: Any, bucket: str, prefix: str, folder: Path) -> None:
    for f in sorted(folder.iterdir()):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())


def fetcher(tmp_path: Path, max_cache_bytes: int = 1 << 30, members: Any = MEMBERS) -> ObjectFetcher:
    return ObjectFetcher(tmp_path / "cache", max_cache_bytes, members)


def same_files(a: Path, b: Path) -> None:
    """`a` holds exactly the members of `b` (peft also writes a README.md, never fetched), byte for byte."""
    assert sorted(p.name for p in a.iterdir()) == sorted(n for n, _, _ in MEMBERS if (b / n).exists())
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name


def test_is_object_url() -> None:
    assert is_object_url("s3://bucket/x") and is_object_url("file:///tmp/x")
    assert not is_object_url("my-adapter") and not is_object_url("/abs/folder")


def test_fetch_copies_the_files(s3: Any, bucket: str, factory: AdapterFactory, tmp_path: Path) -> None:
    good = factory.golden("good")
    upload(s3, bucket, "team/alpha", good)
    got = fetcher(tmp_path).fetch("alpha", f"s3://{bucket}/team/alpha")
    assert got.folder.parent.parent == tmp_path / "cache"
    same_files(got.folder, good)
    assert (got.folder.stat().st_mode & 0o777) == 0o700
    assert all((f.stat().st_mode & 0o777) == 0o600 for f in got.folder.iterdir())
    etags = [s3.head_object(Bucket=bucket, Key=f"team/alpha/{n}")["ETag"] for n in (CONFIG, WEIGHTS)]
    assert all(e in got.version for e in etags)


def test_unchanged_source_is_not_downloaded_again(
    s3: Any, bucket: str, factory: AdapterFactory, tmp_path: Path, gets: list[str]
) -> None:
    upload(s3, bucket, "alpha", factory.golden("good"))
    f = fetcher(tmp_path)
    first = f.fetch("alpha", f"s3://{bucket}/alpha")
    assert len(gets) == 2  # config and weights
    inode = first.folder.stat().st_ino
    second = f.fetch("alpha", f"s3://{bucket}/alpha")
    assert len(gets) == 2
    assert second == first and second.folder.stat().st_ino == inode


def test_replaced_weights_are_a_new_version(s3: Any, bucket: str, factory: AdapterFactory, tmp_path: Path) -> None:
    upload(s3, bucket, "alpha", factory.golden("good"))
    f = fetcher(tmp_path)
    old = f.fetch("alpha", f"s3://{bucket}/alpha")
    new_weights = (factory.golden("good2") / WEIGHTS).read_bytes()
    s3.put_object(Bucket=bucket, Key=f"alpha/{WEIGHTS}", Body=new_weights)
    new = f.fetch("alpha", f"s3://{bucket}/alpha")
    assert new.version != old.version and new.folder != old.folder
    assert (new.folder / WEIGHTS).read_bytes() == new_weights
    assert not old.folder.exists()
    assert [p.name for p in new.folder.parent.iterdir()] == [new.folder.name]


def test_pickle_key_is_refused(s3: Any, bucket: str, factory: AdapterFactory, tmp_path: Path) -> None:
    upload(s3, bucket, "alpha", factory.golden("good"))
    s3.put_object(Bucket=bucket, Key="alpha/adapter_model.BIN", Body=b"not loaded")
    with pytest.raises(InvalidRequest, match="pickle") as err:
        fetcher(tmp_path).fetch("alpha", f"s3://{bucket}/alpha")
    assert err.value.param == "path" and "adapter_model.BIN" in err.value.message
    assert not (tmp_path / "cache").exists()


def test_only_direct_children_count(s3: Any, bucket: str, factory: AdapterFactory, tmp_path: Path) -> None:
    upload(s3, bucket, "alpha", factory.golden("good"))
    s3.put_object(Bucket=bucket, Key="alpha/old/pytorch_model.bin", Body=b"elsewhere")
    got = fetcher(tmp_path).fetch("alpha", f"s3://{bucket}/alpha/")
    same_files(got.folder, factory.golden("good"))


def test_missing_config_is_not_found(s3: Any, bucket: str, factory: AdapterFactory, tmp_path: Path) -> None:
    s3.put_object(Bucket=bucket, Key=f"alpha/{WEIGHTS}", Body=(factory.golden("good") / WEIGHTS).read_bytes())
    with pytest.raises(AdapterNotFound, match=CONFIG) as err:
        fetcher(tmp_path).fetch("alpha", f"s3://{bucket}/alpha")
    assert err.value.status == 404 and err.value.param == "path"


def test_oversize_member_is_refused(s3: Any, bucket: str, factory: AdapterFactory, tmp_path: Path) -> None:
    upload(s3, bucket, "alpha", factory.golden("good"))
    small = ((CONFIG, 1 << 20, True), (WEIGHTS, 1024, True))
    with pytest.raises(PayloadTooLarge, match=f"{WEIGHTS} is larger than 1024 bytes"):
        fetcher(tmp_path, members=small).fetch("alpha", f"s3://{bucket}/alpha")


def test_streamed_bytes_are_bounded_whatever_the_listing_said(tmp_path: Path) -> None:
    read: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(10):
            read.append(i)
            yield b"x" * 100

    with pytest.raises(PayloadTooLarge):
        _write_bounded(chunks(), tmp_path / "out", WEIGHTS, 250)
    assert read == [0, 1, 2]  # stopped at the first chunk past the limit


@pytest.mark.parametrize(
    "url",
    ["s3://UPPER/x", "s3://b/x", "s3://bucket-ok/../x", "s3://bucket-ok/a//b", "s3://bucket-ok/", "s3://bucket-ok/a\0b",
     "ftp://x", "file://relative", "file:///", "file:///a/../b", "/abs/path"],
)  # fmt: skip
def test_bad_urls_are_refused(tmp_path: Path, url: str) -> None:
    f = fetcher(tmp_path)
    for call in (lambda: f.check(url), lambda: f.fetch("alpha", url)):
        with pytest.raises(InvalidRequest, match="s3://BUCKET/PREFIX/NAME") as err:
            call()
        assert err.value.param == "path"


def test_unknown_bucket_is_not_found(s3: Any, tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFound, match="NoSuchBucket") as err:
        fetcher(tmp_path).fetch("alpha", "s3://no-such-bucket-here/alpha")
    assert 400 <= err.value.status < 500


def test_unreachable_store_is_a_typed_error(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens on port 1
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(InvalidRequest, match="cannot be fetched") as err:
        fetcher(tmp_path).fetch("alpha", "s3://some-bucket/alpha")
    assert err.value.param == "path"


def test_cache_evicts_least_recently_used_name(s3: Any, bucket: str, factory: AdapterFactory, tmp_path: Path) -> None:
    good = factory.golden("good")
    size = sum(f.stat().st_size for f in good.iterdir())
    for name in ("a", "b", "c"):
        upload(s3, bucket, name, good)
    f = fetcher(tmp_path, max_cache_bytes=2 * size + 100)
    a = f.fetch("a", f"s3://{bucket}/a")
    b = f.fetch("b", f"s3://{bucket}/b")
    assert f.fetch("a", f"s3://{bucket}/a") == a  # a hit: "a" is now the more recently used
    c = f.fetch("c", f"s3://{bucket}/c")
    assert a.folder.is_dir() and c.folder.is_dir()
    assert not b.folder.exists()


def test_file_url_is_fetched_and_cached(factory: AdapterFactory, tmp_path: Path) -> None:
    src = factory.copy("good", tmp_path / "my src")  # as_uri() percent-encodes the space
    f = fetcher(tmp_path)
    got = f.fetch("alpha", src.as_uri())
    same_files(got.folder, src)
    assert f.fetch("alpha", src.as_uri()) == got
    (src / PROFILE).write_text("{}")
    changed = f.fetch("alpha", src.as_uri())
    assert changed.version != got.version and (changed.folder / PROFILE).read_text() == "{}"


def test_file_url_refuses_symlinked_member(factory: AdapterFactory, tmp_path: Path) -> None:
    src = factory.copy("good", tmp_path / "src")
    shutil.move(src / CONFIG, tmp_path / "elsewhere.json")
    (src / CONFIG).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(InvalidRequest, match="symlink"):
        fetcher(tmp_path).fetch("alpha", src.as_uri())
    assert not any((tmp_path / "cache" / "alpha").iterdir())


def test_file_url_refuses_pickles_and_missing_folders(factory: AdapterFactory, tmp_path: Path) -> None:
    src = factory.copy("good", tmp_path / "src")
    (src / "training_args.bin").write_bytes(b"x")
    with pytest.raises(InvalidRequest, match="pickle"):
        fetcher(tmp_path).fetch("alpha", src.as_uri())
    with pytest.raises(AdapterNotFound):
        fetcher(tmp_path).fetch("alpha", (tmp_path / "absent").as_uri())
