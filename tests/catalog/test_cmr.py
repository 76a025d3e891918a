"""CMR search through python-cmr/earthaccess against a loopback fake of CMR."""

import copy
import json
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from magg_core.catalog.cmr import CmrError, GranuleSearch, RetryPolicy, cmr_url, search_granules
from magg_core.cycles import TimeRange
from tests.fakes.cmr import FakeCmr, Fault, umm_item

FAST = RetryPolicy(attempts=4, backoff_s=0.01, timeout_s=5.0)
T0 = datetime(2023, 12, 20, tzinfo=UTC)
RANGE = TimeRange(T0, T0 + timedelta(days=91))
BOX = (-180.0, -90.0, 180.0, -60.0)
REALDATA = Path(__file__).parents[1] / "data" / "realdata"


def granule_name(i: int) -> str:
    t = T0 + timedelta(minutes=3 * i)
    return f"ATL06_{t:%Y%m%d%H%M%S}_{i % 1387 + 1:04d}2210_007_01.h5"


def items(n: int, lat: float = -75.0) -> list[dict]:
    out = []
    for i in range(n):
        lon = -180 + (i * 0.137) % 359
        ring = [
            (lon, lat - 1),
            (lon + 0.5, lat - 1),
            (lon + 0.5, lat + 1),
            (lon, lat + 1),
            (lon, lat - 1),
        ]
        t = T0 + timedelta(minutes=3 * i)
        out.append(umm_item(granule_name(i), ring, t, t + timedelta(minutes=2)))
    return out


@pytest.fixture
def fake_cmr():
    fake = FakeCmr().start()
    yield fake
    fake.stop()


def search(**kw):
    return GranuleSearch(time_range=RANGE, bounding_box=BOX, **kw)


def test_pages_over_more_than_2000_granules_with_search_after(fake_cmr):
    fake_cmr.items = items(2345)
    found = search_granules(search(), url=fake_cmr.url, retry=FAST)
    names = [g["umm"]["GranuleUR"] for g in found]
    assert names == [granule_name(i) for i in range(2345)]  # each once, in order
    pages = fake_cmr.search_requests()
    assert len(pages) == 2
    assert pages[0].search_after is None
    assert pages[1].search_after is not None  # the token from page 1, sent back
    assert dict(pages[0].params)["page_size"] == "2000"


def test_short_pages_mid_result_do_not_end_the_query(fake_cmr):
    # CMR serves 4 records although 2,000 were asked for, then the other 2:
    # earthaccess's get_all() stopped after the first page (4 of 6).
    fake_cmr.items = items(6)
    fake_cmr.page_limit = 4
    found = search_granules(search(), url=fake_cmr.url, retry=FAST)
    assert [g["umm"]["GranuleUR"] for g in found] == [granule_name(i) for i in range(6)]
    pages = fake_cmr.search_requests()
    assert [dict(p.params)["page_size"] for p in pages] == ["2000", "2000"]
    assert pages[0].search_after is None and pages[1].search_after is not None


def test_many_short_pages_each_followed_by_its_token(fake_cmr):
    fake_cmr.items = items(23)
    fake_cmr.page_limit = 5
    found = search_granules(search(), url=fake_cmr.url, retry=FAST)
    assert [g["umm"]["GranuleUR"] for g in found] == [granule_name(i) for i in range(23)]
    tokens = [p.search_after for p in fake_cmr.search_requests()]
    assert len(tokens) == 5 and len(set(tokens)) == 5  # every page asked once, none twice


@pytest.mark.parametrize("page_limit", [None, 3])
def test_fewer_records_than_cmr_hits_is_an_error(fake_cmr, page_limit):
    fake_cmr.items = items(6)
    fake_cmr.page_limit = page_limit
    fake_cmr.unserved_hits = 2  # CMR counts 8 but only ever serves 6
    with pytest.raises(CmrError) as info:
        search_granules(search(), url=fake_cmr.url, retry=FAST)
    message = str(info.value)
    assert "CMR-Hits says 8 granules but 6 were received" in message
    assert f"CMR granule search at {fake_cmr.url}" in message
    assert "short_name=ATL06 version=007 provider=NSIDC_CPRD" in message


def test_overlapping_pages_keep_each_record_once_and_page_on_to_the_last(fake_cmr):
    # Pages [0 1 2] [2 3 4] [5]: after page 2, 6 records had arrived for CMR-Hits 6,
    # and the search stopped there, one record short, with one of them twice.
    fake_cmr.items = items(6)
    fake_cmr.page_limit = 3
    fake_cmr.overlap = 1
    found = search_granules(search(), url=fake_cmr.url, retry=FAST)
    assert [g["umm"]["GranuleUR"] for g in found] == [granule_name(i) for i in range(6)]
    assert len(fake_cmr.search_requests()) == 3


def test_a_repeated_record_does_not_hide_a_missing_one(fake_cmr):
    fake_cmr.items = items(6)
    fake_cmr.page_limit = 3
    fake_cmr.overlap = 1
    fake_cmr.unserved_hits = 1  # 7 granules exist; 7 records arrive, one of them twice
    with pytest.raises(CmrError, match="CMR-Hits says 7 granules but 6 were received, and 1 rep"):
        search_granules(search(), url=fake_cmr.url, retry=FAST)


def test_real_records_are_told_apart_by_concept_id(fake_cmr):
    """NSIDC_ECS records (GranuleUR ``SC:ATL06.005:…``) as CMR wrote them, on overlapping pages."""
    page = json.loads((REALDATA / "cmr" / "earthaccess_atl06_umm.json").read_text())
    real = page["items"][0]
    copies = []
    for i in range(5):
        record = copy.deepcopy(real)
        record["meta"]["concept-id"] = f"G{2159085058 + i}-NSIDC_ECS"
        record["umm"]["GranuleUR"] = f"SC:ATL06.005:{228825416 + i}"
        copies.append(record)
    fake_cmr.items = copies
    fake_cmr.page_limit = 2
    fake_cmr.overlap = 2  # the second page is the first again
    found = search_granules(
        GranuleSearch(version="005", provider="NSIDC_ECS"), url=fake_cmr.url, retry=FAST
    )
    assert [g["meta"]["concept-id"] for g in found] == [r["meta"]["concept-id"] for r in copies]
    assert found[0] == {"meta": real["meta"], "umm": real["umm"]}


def test_an_answer_without_cmr_hits_is_an_error(fake_cmr, monkeypatch):
    fake_cmr.items = items(2)
    real_search = fake_cmr._search

    def without_hits(params, token):
        status, body, headers = real_search(params, token)
        return status, body, {k: v for k, v in headers.items() if k != "CMR-Hits"}

    monkeypatch.setattr(fake_cmr, "_search", without_hits)
    with pytest.raises(CmrError, match="not a UMM-JSON page \\(CMR-Hits header is None\\)"):
        search_granules(search(), url=fake_cmr.url, retry=FAST)


def test_query_parameters_reach_cmr(fake_cmr):
    fake_cmr.items = items(3)
    search_granules(
        GranuleSearch(time_range=RANGE, bounding_box=(170.0, -80.0, -170.0, -60.0)),
        url=fake_cmr.url,
        retry=FAST,
    )
    params = dict(fake_cmr.search_requests()[0].params)
    assert fake_cmr.requests[0].path == "/search/granules.umm_json"
    assert params["short_name"] == "ATL06"
    assert params["version"] == "007"
    assert params["provider"] == "NSIDC_CPRD"
    assert params["temporal[]"] == "2023-12-20T00:00:00Z,2024-03-20T00:00:00Z"
    assert params["bounding_box"] == "170.0,-80.0,-170.0,-60.0"


def test_filters_are_applied_by_cmr(fake_cmr):
    inside = items(5)
    later = umm_item(
        "ATL06_20250101000000_00012610_007_01.h5",
        [(0, -75), (1, -75), (1, -74), (0, -75)],
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2025, 1, 1, 0, 5, tzinfo=UTC),
    )
    other_version = umm_item(
        "ATL06_20231221000000_00022210_006_01.h5",
        [(0, -75), (1, -75), (1, -74), (0, -75)],
        T0 + timedelta(days=1),
        T0 + timedelta(days=1, minutes=5),
        version="006",
    )
    fake_cmr.items = [*inside, later, other_version]
    found = search_granules(search(), url=fake_cmr.url, retry=FAST)
    assert [g["umm"]["GranuleUR"] for g in found] == [i["umm"]["GranuleUR"] for i in inside]


def test_empty_result_is_an_empty_list(fake_cmr):
    assert search_granules(search(), url=fake_cmr.url, retry=FAST) == []


def test_retries_429_and_500_during_paging(fake_cmr):
    fake_cmr.items = items(2345)
    fake_cmr.inject(Fault(status=429, retry_after=0), times=2)  # page 1, twice
    fake_cmr.inject(Fault(status=500), times=1, after=3)  # page 1 served, then page 2 fails once
    found = search_granules(search(), url=fake_cmr.url, retry=FAST)
    assert len({g["umm"]["GranuleUR"] for g in found}) == len(found) == 2345
    answered = [r.answered for r in fake_cmr.requests]
    assert answered == [429, 429, 200, 500, 200]
    # The retried page asked for the same search-after position.
    assert fake_cmr.requests[3].search_after == fake_cmr.requests[4].search_after is not None


def test_honours_retry_after(fake_cmr):
    fake_cmr.items = items(2)
    fake_cmr.inject(Fault(status=429, retry_after=1))
    started = time.monotonic()
    assert len(search_granules(search(), url=fake_cmr.url, retry=FAST)) == 2
    assert time.monotonic() - started >= 0.9


def test_retries_dropped_connections_and_stalls(fake_cmr):
    fake_cmr.items = items(10)
    drop, stall = Fault(drop=True), Fault(stall_s=1.5, drop=True)
    fake_cmr.inject(drop)
    fake_cmr.inject(stall, after=1)
    policy = RetryPolicy(attempts=4, backoff_s=0.01, timeout_s=0.5)
    started = time.monotonic()
    assert len(search_granules(search(), url=fake_cmr.url, retry=policy)) == 10
    assert time.monotonic() - started < 1.4  # the stalled request was abandoned at the timeout
    assert [r.fault for r in fake_cmr.requests] == [drop, stall, None]


def test_hard_failure_after_retry_budget(fake_cmr):
    fake_cmr.items = items(10)
    fake_cmr.inject(Fault(status=500), times=10)
    with pytest.raises(CmrError) as info:
        search_granules(search(), url=fake_cmr.url, retry=FAST)
    message = str(info.value)
    assert "CMR granule search at " + fake_cmr.url in message
    assert "HTTP 500" in message
    assert "short_name=ATL06 version=007 provider=NSIDC_CPRD" in message
    assert "temporal=" in message and "bounding_box=" in message
    assert len(fake_cmr.requests) == FAST.attempts


def test_bad_request_is_not_retried(fake_cmr):
    fake_cmr.inject(Fault(status=400), times=5)
    with pytest.raises(CmrError, match="HTTP 400"):
        search_granules(search(), url=fake_cmr.url, retry=FAST)
    assert len(fake_cmr.requests) == 1


def test_unreachable_cmr_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/search/"
    with pytest.raises(CmrError, match=f"CMR granule search at {url} failed \\(connection failed"):
        search_granules(search(), url=url, retry=FAST)


def test_cmr_url_resolution(monkeypatch):
    monkeypatch.delenv("MAGG_CMR_URL", raising=False)
    assert cmr_url() == "https://cmr.earthdata.nasa.gov/search/"
    monkeypatch.setenv("MAGG_CMR_URL", "http://127.0.0.1:9/search")
    assert cmr_url() == "http://127.0.0.1:9/search/"
    assert cmr_url("http://x/search/") == "http://x/search/"
