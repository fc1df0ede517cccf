"""pgops.airflow.audit.fetch: the named objects, fetched at once, each decompressed by its magic bytes; a missing or undecodable one
left out, any other S3 error raised."""

import gzip
import threading
from datetime import UTC, datetime

import pytest
from botocore.exceptions import ClientError

from pgops.airflow.audit import fetch


class _Body:
    def __init__(self, data: bytes):
        self.data = data

    def read(self) -> bytes:
        return self.data


class FakeS3:
    def __init__(self, objects: dict[str, bytes], denied: tuple[str, ...] = ()):
        self.objects, self.denied = objects, denied
        self.threads: set[int] = set()
        self.calls: list[str] = []

    def get_object(self, *, Bucket: str, Key: str):  # noqa: N803 (boto3's names)
        self.threads.add(threading.get_ident())
        self.calls.append(Key)
        if Key in self.denied:
            raise ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject")
        if Key not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")
        return {"Body": _Body(self.objects[Key]), "LastModified": datetime(2026, 11, 29, tzinfo=UTC)}


def test_fetch_returns_what_exists_decompressed_and_skips_missing_and_broken():
    keys = [f"base/{i:02d}/backup.info" for i in range(20)]
    objects = {k: f"backup_name=n{i}\n".encode() for i, k in enumerate(keys) if i % 3}
    objects["wals/x.gz"] = gzip.compress(b"gz body")
    objects["wals/broken.gz"] = b"\x1f\x8b\x08garbage"  # gzip magic, broken stream
    s3 = FakeS3(objects)
    out, modified = fetch(s3, "b", [*keys, "wals/x.gz", "wals/broken.gz", keys[1]])
    assert out == {**{k: v for k, v in objects.items() if k.startswith("base/")}, "wals/x.gz": b"gz body"}
    assert set(modified) == set(out)
    assert sorted(s3.calls) == sorted([*keys, "wals/x.gz", "wals/broken.gz"])  # each key once
    assert len(s3.threads) > 1  # fetched at once


def test_fetch_raises_an_error_that_is_not_a_missing_object():
    s3 = FakeS3({"a": b"1", "b": b"2"}, denied=("b",))
    with pytest.raises(ClientError):
        fetch(s3, "bucket", ["a", "b"])
