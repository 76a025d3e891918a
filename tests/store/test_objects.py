"""Many small objects: put and removed a bounded number at a time; a folder of them removed
whole, nothing beside it, in few requests on S3."""

from __future__ import annotations

import threading
import time

import pytest
from zarr.core.sync import sync

from magg_core.store.arrays import open_store
from magg_core.store.objects import delete_prefix, put_many
from tests.flow_support import s3_proxy

KEYS = 1_250  # more than one DeleteObjects request holds (1,000)


def _put(client, bucket: str, keys: list[str]) -> None:
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")


def _listed(client, bucket: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_a_prefix_on_s3_goes_in_bulk_deletes_and_only_it(s3_env, monkeypatch):
    bucket = s3_env.create_bucket("magg-delete-prefix")
    inside = [f"s.zarr/fragments/12/g{i // 50}/{i}.bin" for i in range(KEYS)]
    beside = ["s.zarr/fragments/120/kept.bin", "s.zarr/fragments/12.json", "s.zarr/12/zarr.json"]
    _put(s3_env.client, bucket, inside + beside)

    with s3_proxy(s3_env.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        delete_prefix(open_store(f"s3://{bucket}/s.zarr"), "fragments/12")
        calls = proxy.since(0)

    assert _listed(s3_env.client, bucket) == set(beside)
    deletes = [c for c in calls if c.method in ("POST", "DELETE")]
    assert [c.method for c in deletes] == ["POST", "POST"]  # DeleteObjects, 1,000 keys each
    assert all(c.succeeded for c in deletes)


def test_a_prefix_in_a_local_store_goes_and_only_it(tmp_path):
    root = tmp_path / "s.zarr"
    for relative in ["levels/12/1.npz", "levels/12/2.npz", "levels/120/3.npz", "12/zarr.json"]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")

    delete_prefix(open_store(str(root)), "levels/12")

    left = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert left == {"levels/120/3.npz", "12/zarr.json"}


def test_a_read_only_store_refuses(s3_env):
    bucket = s3_env.create_bucket("magg-delete-read-only")
    _put(s3_env.client, bucket, ["s.zarr/levels/12/1.npz"])
    with pytest.raises(ValueError, match="read-only"):
        delete_prefix(open_store(f"s3://{bucket}/s.zarr", read_only=True), "levels/12")
    assert _listed(s3_env.client, bucket) == {"s.zarr/levels/12/1.npz"}


def test_many_objects_are_put_and_removed_a_bounded_number_at_a_time(s3_env, monkeypatch):
    bucket = s3_env.create_bucket("magg-put-many")
    _put(s3_env.client, bucket, ["s.zarr/old/gone.bin", "s.zarr/old/kept.bin"])
    objects = {f"new/{i}.bin": bytes([i]) * (i + 1) for i in range(20)} | {"old/gone.bin": None}
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow(method: str, bucket: str, key: str, access_key: str | None) -> None:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)  # long enough for the other requests in flight to arrive
        with lock:
            in_flight[0] -= 1

    with s3_proxy(s3_env.url) as proxy:
        proxy.fault = slow
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        sync(put_many(open_store(f"s3://{bucket}/s.zarr"), objects, limit=4))
        calls = proxy.since(0)

    kept = {f"s.zarr/{key}" for key, data in objects.items() if data is not None}
    assert _listed(s3_env.client, bucket) == kept | {"s.zarr/old/kept.bin"}
    for key, data in objects.items():
        if data is not None:
            assert (
                s3_env.client.get_object(Bucket=bucket, Key=f"s.zarr/{key}")["Body"].read() == data
            )
    assert [c.method for c in calls].count("PUT") == 20
    assert len(calls) == 21  # and one request removing the object put as None
    assert 2 <= peak[0] <= 4  # at once, and never more than the limit
