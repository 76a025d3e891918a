"""A marker of done work proves the work is still there (issue 17, §4).

A run leaves markers that stand for work done: each cell's record and its
Prefect cache entry (the cell is not gridded again), each granule's extract
record (it is not read again). After a successful run on moto S3, these
tests lose part of the output behind a marker -- a chunk deleted or
overwritten, a staging object of the coarse levels deleted or cut short, a
coarse chunk deleted, a fragment deleted, cut short or bit-flipped -- and run
again: exactly the lost work is done again (counted by the task runs' states
and by the record PUTs that reached S3 through a loopback proxy), and the
store equals the oracle (h5py + healpy + pandas) again.
"""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest
import zarr

from magg.flows.process_cycle import process_cycle
from magg_core.config import load_config
from magg_core.store.arrays import open_store
from magg_core.store.fragments import fragment_key
from magg_core.store.staging import staged_orders, staging_key
from tests.flow_support import (
    SAMPLE,
    S3Proxy,
    assert_store_matches_oracle,
    cell_task_runs,
    record_writes,
    records_by_parent,
    s3_proxy,
    sample_in_s3,
)

IN, OUT = "magg-heal-in", "magg-heal-out"
CONFIG = load_config()


@pytest.fixture(scope="module")
def sample(moto_server, tmp_path_factory):
    sample = sample_in_s3(moto_server, tmp_path_factory.mktemp("heal"), IN, **SAMPLE)
    moto_server.create_bucket(OUT)
    return sample


@pytest.fixture
def proxy(s3_env, monkeypatch):
    """Every S3 client of the run (worker processes included) goes through the proxy."""
    with s3_proxy(s3_env.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        yield proxy


def _run(sample, store: str):
    state = process_cycle(
        catalog=str(sample.catalog_path),
        store=store,
        credentials="environment",
        granule_mirror=sample.mirror,
        keep_fragments=True,
        return_state=True,
    )
    return state


def _cells_ran(state) -> dict[int, str]:
    runs = cell_task_runs(state.state_details.flow_run_id)
    return {int(r.name.removeprefix("cell-")): r.state.name for r in runs}


def _extracts_written(proxy: S3Proxy, store: str, mark: int) -> set[str]:
    """Granules whose extract record was written (so whose granule was read) since ``mark``."""
    bucket, _, prefix = store.removeprefix("s3://").partition("/")
    head = f"{prefix}/fragments/{CONFIG.output.child_order}/"
    return {
        call.key.removeprefix(head).split("/")[0]
        for call in proxy.since(mark)
        if call.bucket == bucket
        and call.method == "PUT"
        and call.succeeded
        and call.key.startswith(head)
        and call.key.endswith("/extract.json")
    }


def _levels(store: str) -> dict[tuple[int, str], np.ndarray]:
    """Every statistic of every coarse level, read whole."""
    out = {}
    for order in staged_orders(CONFIG):
        group = zarr.open_group(open_store(store, read_only=True), path=str(order), mode="r")
        out.update({(order, name): array[:] for name, array in group.arrays()})
    return out


def _key(store: str, relative: str) -> tuple[str, str]:
    bucket, _, prefix = store.removeprefix("s3://").partition("/")
    return bucket, f"{prefix}/{relative}"


def _get(s3, store: str, relative: str) -> bytes:
    bucket, key = _key(store, relative)
    return s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _put(s3, store: str, relative: str, body: bytes) -> None:
    bucket, key = _key(store, relative)
    s3.client.put_object(Bucket=bucket, Key=key, Body=body)


def _delete(s3, store: str, relative: str) -> None:
    bucket, key = _key(store, relative)
    s3.client.delete_object(Bucket=bucket, Key=key)


def _with_data(sample) -> list[int]:
    return [p for p in sample.parents if sample.oracle.get(p) is not None]


def _chunk(sample, parent: int, statistic: str) -> str:
    return f"{CONFIG.output.child_order}/{statistic}/c/{sample.parents.index(parent)}"


def _granule_cells(sample) -> dict[str, list[int]]:
    cells: dict[str, list[int]] = {}
    for parent in sample.parents:
        for granule in sample.catalog.cells[parent]:
            cells.setdefault(granule.name, []).append(parent)
    return cells


def test_a_lost_or_overwritten_chunk_is_gridded_again_and_nothing_else(
    sample, s3_env, proxy, prefect_server
):
    store = f"s3://{OUT}/chunks.zarr"
    assert _run(sample, store).is_completed()
    deleted, overwritten = _with_data(sample)[:2]
    _delete(s3_env, store, _chunk(sample, deleted, "h_mean"))
    original = _get(s3_env, store, _chunk(sample, overwritten, "count"))
    _put(s3_env, store, _chunk(sample, overwritten, "count"), bytes(len(original)))

    mark = proxy.mark()
    second = _run(sample, store)

    assert second.is_completed(), second.message
    lost = {deleted, overwritten}
    assert _cells_ran(second) == {p: "Completed" if p in lost else "Cached" for p in sample.parents}
    assert set(record_writes(proxy, store, mark)) == lost
    assert _extracts_written(proxy, store, mark) == set()  # the fragments were all there
    assert _get(s3_env, store, _chunk(sample, overwritten, "count")) == original
    assert_store_matches_oracle(store, sample)


def test_a_lost_staging_object_redoes_its_cell_and_the_levels_heal(
    sample, s3_env, proxy, prefect_server
):
    """The coarse levels are assembled from every parent's staging object on every run:
    one deleted or cut short must not turn into fill values there, and a deleted coarse
    chunk (no marker stands for it) is written again by the next assembly."""
    store = f"s3://{OUT}/staging.zarr"
    assert _run(sample, store).is_completed()
    before = _levels(store)
    deleted, truncated = _with_data(sample)[:2]
    _delete(s3_env, store, staging_key(CONFIG, deleted))
    staged = _get(s3_env, store, staging_key(CONFIG, truncated))
    _put(s3_env, store, staging_key(CONFIG, truncated), staged[: len(staged) // 2])
    coarsest = min(staged_orders(CONFIG))
    _delete(s3_env, store, f"{coarsest}/h_mean/c/0")

    mark = proxy.mark()
    second = _run(sample, store)

    assert second.is_completed(), second.message
    lost = {deleted, truncated}
    assert _cells_ran(second) == {p: "Completed" if p in lost else "Cached" for p in sample.parents}
    assert set(record_writes(proxy, store, mark)) == lost
    after = _levels(store)
    assert after.keys() == before.keys()
    for key, values in before.items():
        np.testing.assert_array_equal(after[key], values, err_msg=str(key))
    assert_store_matches_oracle(store, sample)


def test_a_lost_or_cut_fragment_is_extracted_again_from_its_granule_alone(
    sample, s3_env, proxy, prefect_server
):
    store = f"s3://{OUT}/fragments.zarr"
    assert _run(sample, store).is_completed()
    cells = _granule_cells(sample)
    deleted, truncated = sorted(cells)[:2]
    lost = {
        deleted: fragment_key(CONFIG, deleted, cells[deleted][0]),
        truncated: fragment_key(CONFIG, truncated, cells[truncated][-1]),
    }
    original = {name: _get(s3_env, store, key) for name, key in lost.items()}
    _delete(s3_env, store, lost[deleted])
    _put(s3_env, store, lost[truncated], original[truncated][:-100])

    mark = proxy.mark()
    second = _run(sample, store)

    assert second.is_completed(), second.message
    assert _extracts_written(proxy, store, mark) == {deleted, truncated}
    assert set(_cells_ran(second).values()) == {"Cached"}  # their chunks are intact
    assert {name: _get(s3_env, store, key) for name, key in lost.items()} == original
    assert_store_matches_oracle(store, sample)

    # And a third run finds everything proven: nothing is read or gridded.
    mark = proxy.mark()
    third = _run(sample, store)
    assert third.is_completed() and _extracts_written(proxy, store, mark) == set()
    assert record_writes(proxy, store, mark) == {}


def test_a_fragment_corrupt_at_its_size_fails_its_cell_once_then_heals(
    sample, s3_env, proxy, prefect_server
):
    """A bit flip keeps the size the extract record proves; the cell that reads the fragment
    finds it by its CRC-32, names it, and removes it, so the next run extracts that granule
    again and the cell is whole."""
    store = f"s3://{OUT}/flipped.zarr"
    assert _run(sample, store).is_completed()
    cells = _granule_cells(sample)
    name = next(n for n in sorted(cells) if any(p in _with_data(sample) for p in cells[n]))
    parent = next(p for p in cells[name] if p in _with_data(sample))
    key = fragment_key(CONFIG, name, parent)
    data = bytearray(_get(s3_env, store, key))
    data[_inside_member(bytes(data), "h_li.npy")] ^= 0xFF
    _put(s3_env, store, key, bytes(data))
    _delete(s3_env, store, _chunk(sample, parent, "h_mean"))  # so the cell runs, reading it

    second = _run(sample, store)

    assert second.is_failed()
    record = records_by_parent(store)[parent].result
    assert record.status in ("partial", "failed")
    assert [f.url.rsplit("/", 1)[1] for f in record.files_failed] == [name]
    assert "unreadable" in record.files_failed[0].reason
    assert "CRC" in record.files_failed[0].reason

    mark = proxy.mark()
    third = _run(sample, store)

    assert third.is_completed(), third.message
    assert _extracts_written(proxy, store, mark) == {name}
    assert set(record_writes(proxy, store, mark)) == {parent}
    assert records_by_parent(store)[parent].result.status == "ok"
    assert_store_matches_oracle(store, sample)


def _inside_member(npz: bytes, member: str) -> int:
    """The offset of a byte in the middle of ``member``'s stored data in an ``.npz`` (zip):
    a flip there changes what the member's CRC-32 covers, whatever the entries around it."""
    info = zipfile.ZipFile(io.BytesIO(npz)).getinfo(member)
    name_length, extra_length = struct.unpack_from("<HH", npz, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length
    return start + info.compress_size // 2
