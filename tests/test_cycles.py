from datetime import UTC, date, datetime, timedelta

import pytest

from magg_core.cycles import (
    CYCLE_DAYS,
    FIRST_DATA,
    CycleError,
    GranuleNameError,
    TimeRange,
    cycle_query_range,
    cycle_range,
    date_range,
    granule_fields,
    parse_granule_name,
)


def test_parse_real_granule_name():
    name = parse_granule_name("ATL06_20181014103720_02410111_007_01.h5")
    assert name is not None
    assert (name.product, name.rgt, name.cycle, name.region) == ("ATL06", 241, 1, 11)
    assert (name.version, name.revision) == ("007", "01")
    assert name.start == datetime(2018, 10, 14, 10, 37, 20, tzinfo=UTC)


def test_parse_ignores_url_path():
    url = "s3://nsidc-cumulus-prod-protected/ATLAS/ATL06/007/2023/12/18/ATL06_20231218010203_13712205_007_01.h5"
    name = parse_granule_name(url)
    assert name is not None and (name.rgt, name.cycle, name.region) == (1371, 22, 5)


@pytest.mark.parametrize(
    "bad",
    [
        "ATL06_20181014103720_02410111_007_01.nc",
        "ATL06_2018101410372_02410111_007_01.h5",
        "ATL06_20181314103720_02410111_007_01.h5",  # month 13
        "granule.h5",
        "",
    ],
)
def test_parse_rejects_other_names(bad):
    with pytest.raises(GranuleNameError, match="not a granule name|is not an ICESat-2 granule"):
        parse_granule_name(bad)
    assert granule_fields(bad) is None


@pytest.mark.parametrize(
    ("url", "quoted"),
    [
        ("processed_ATL06_20181014103720_02410111_007_01.h5", "'processed_ATL06_"),
        ("s3://b/ATL06/granule.h5", "'granule.h5'"),
        ("s3://b/ATL06_20181014103720_02410111_007_01.h5/", "names no file"),
    ],
)
def test_a_rejected_name_is_quoted(url, quoted):
    with pytest.raises(GranuleNameError) as caught:
        parse_granule_name(url)
    assert quoted in str(caught.value) and isinstance(caught.value, ValueError)


def test_real_granule_lies_inside_its_nominal_cycle():
    # RGT 241 of cycle 1 was acquired 2018-10-14: the nominal range must hold it,
    # and 240 revolutions of 91/1387 days must take it back to the start.
    name = parse_granule_name("ATL06_20181014103720_02410111_007_01.h5")
    nominal = cycle_range(1)
    assert nominal.start <= name.start < nominal.end
    rev = timedelta(days=CYCLE_DAYS / 1387)
    assert abs(name.start - 240 * rev - nominal.start) < timedelta(days=1)
    # Cycle 2 began on 2018-12-28.
    assert cycle_range(2).start.date() == date(2018, 12, 28)


def test_cycles_are_contiguous_and_91_days():
    for cycle in (1, 2, 22, 30):
        r = cycle_range(cycle)
        assert r.end - r.start == timedelta(days=91)
        assert cycle_range(cycle + 1).start == r.end


def test_query_range_is_padded_but_not_before_first_data():
    nominal, padded = cycle_range(22), cycle_query_range(22)
    assert padded.start < nominal.start and padded.end > nominal.end
    assert cycle_query_range(1).start == FIRST_DATA
    # Both conventions for where a cycle starts are covered: counting 91-day
    # cycles from the first data (2018-10-13) ends 15 days later than nominal.
    from_first_data_end = FIRST_DATA + timedelta(days=91 * 22)
    assert padded.end > from_first_data_end


@pytest.mark.parametrize("cycle", [0, -3])
def test_cycle_before_launch_is_an_error(cycle):
    with pytest.raises(CycleError, match="before launch"):
        cycle_range(cycle)


@pytest.mark.parametrize("cycle", [1.5, "22", True])
def test_cycle_must_be_an_integer(cycle):
    with pytest.raises(CycleError, match="integer"):
        cycle_range(cycle)


def test_date_range_end_date_is_inclusive():
    r = date_range("2023-01-01", "2023-01-31")
    assert r.start == datetime(2023, 1, 1, tzinfo=UTC)
    assert r.end == datetime(2023, 2, 1, tzinfo=UTC)
    assert r.isoformat() == ("2023-01-01T00:00:00Z", "2023-02-01T00:00:00Z")
    assert date_range(date(2023, 1, 1), date(2023, 1, 1)).end == datetime(2023, 1, 2, tzinfo=UTC)
    exact = date_range("2023-01-01T06:00:00Z", "2023-01-01T07:00:00Z")
    assert exact.end - exact.start == timedelta(hours=1)


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2023-02-01", "2023-01-01", "not after start"),
        ("2017-01-01", "2018-01-01", "before the first ICESat-2 data"),
        ("yesterday", "2023-01-01", "not an ISO date"),
    ],
)
def test_bad_date_ranges(start, end, message):
    with pytest.raises(CycleError, match=message):
        date_range(start, end)


def test_time_range_needs_timezones():
    with pytest.raises(CycleError, match="timezone"):
        TimeRange(datetime(2023, 1, 1), datetime(2023, 1, 2))
