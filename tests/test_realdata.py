"""Real NASA granules and CMR records (``tests/data/realdata``) through magg's production paths.

Every statistic is compared with the independent oracle (h5py + healpy +
pandas, :mod:`tests.oracle`), at every level of the built-in config; the
files are checked to be the published bytes, and time, names, links and the
refusal of another product are checked against what the real files and
records themselves say.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
import pytest

from magg.flows.cli import main
from magg_core.catalog.catalog import build_catalog, catalog_from_records, load_catalog
from magg_core.catalog.cmr import record_granule_name
from magg_core.config import load_config
from magg_core.cycles import ATLAS_EPOCH, delta_time_utc
from magg_core.extract.granule import extract_granule, stored_extract
from magg_core.granules.read import GranuleReadError, read_parents
from magg_core.granules.sample import write_sample
from magg_core.grid.plan import plan_cells
from magg_core.schema import ExtractRequest
from tests import oracle
from tests.fakes.cmr import FakeCmr, umm_item
from tests.grid.test_levels import ORDERS, assert_cell_ids, assert_level_equals, level_arrays

REALDATA = Path(__file__).parent / "data" / "realdata"
THWAITES = REALDATA / "atl06" / "processed_ATL06_20181015100401_02560110_003_01.h5"
PACIFIC = REALDATA / "atl06" / "ATL06_20181013235645_02340114_209_01.h5"
ATL07 = REALDATA / "other-products" / "processed_ATL07-01_20190225115500_09020201_003_02.h5"
ECS_RECORD = REALDATA / "cmr" / "earthaccess_atl06_umm.json"
ECS_FEED = REALDATA / "cmr" / "earthaccess_atl06.json"
GRANULES = (THWAITES, PACIFIC)
CONFIG = load_config("atl06")
BUCKET = "nsidc-real"


def mirror_name(path: Path) -> str:
    """The granule's name (the NSIDC subsetter prefixes ``processed_`` to it)."""
    return path.name.removeprefix("processed_")


def parents_of(paths) -> list[int]:
    """The order-6 parents holding the oracle's good points (morton words, ascending)."""
    cells = oracle.good_points(paths)["cell"].to_numpy()
    return sorted({oracle.parent_morton(int(p), 6) for p in np.unique(cells >> 12)})


# -- the files are the published bytes --------------------------------------------------------


def test_every_file_is_byte_for_byte_the_one_its_readme_names():
    table = re.findall(
        r"^\| `([^`]+)` [^|]*\| `([0-9a-f]{64})` \|",
        REALDATA.joinpath("README.md").read_text(),
        flags=re.M,
    )
    assert len(table) == 7
    for name, digest in table:
        assert hashlib.sha256((REALDATA / name).read_bytes()).hexdigest() == digest, name
    stored = {p.relative_to(REALDATA).as_posix() for p in REALDATA.rglob("*") if p.is_file()}
    assert stored - {n for n, _ in table} == {"README.md", ".gitattributes"}


# -- time -------------------------------------------------------------------------------------


def utc_attribute(f: h5py.File, name: str) -> datetime:
    text = f[f"ancillary_data/{name}"][0].decode()
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@pytest.mark.parametrize("path", [THWAITES, PACIFIC, ATL07], ids=lambda p: p.name[:24])
def test_delta_time_counts_from_the_epoch_the_real_files_state(path):
    """``data_start_utc`` = epoch + ``start_delta_time`` (and the same for the end), to 1 µs."""
    assert ATLAS_EPOCH == datetime(2018, 1, 1, tzinfo=UTC)
    with h5py.File(path, "r") as f:
        for which in ("start", "end"):
            seconds = float(f[f"ancillary_data/{which}_delta_time"][0])
            stated = utc_attribute(f, f"data_{which}_utc")
            assert abs((delta_time_utc(seconds) - stated).total_seconds()) < 1e-6, which


def test_the_sample_states_its_time_as_the_real_files_do(tmp_path):
    (granule,) = write_sample(tmp_path, n_granules=1)
    with h5py.File(granule.path, "r") as f:
        seconds = float(f["ancillary_data/start_delta_time"][0])
        first = min(
            float(f[f"{b}/land_ice_segments/delta_time"][0]) for b in oracle.BEAMS if b in f
        )
        stated = utc_attribute(f, "data_start_utc")
    assert seconds == first
    assert abs((delta_time_utc(seconds) - stated).total_seconds()) < 1e-6
    # The name's start time is the first point's UTC second, as in NSIDC's names.
    named = datetime.strptime(granule.name[6:20], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    assert abs((stated - named).total_seconds()) < 1.0


# -- reading: local files and S3 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def real_s3(moto_server):
    moto_server.create_bucket(BUCKET)
    for path in (*GRANULES, ATL07):
        moto_server.client.upload_file(str(path), BUCKET, f"ATLAS/{path.name}")
    return {path: f"s3://{BUCKET}/ATLAS/{path.name}" for path in (*GRANULES, ATL07)}


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("path", GRANULES, ids=lambda p: p.name[:24])
def test_real_granules_read_the_oracles_points(path, where, real_s3, moto_server):
    expected = oracle.good_points([path])
    parents = parents_of([path])
    assert len(expected) == {THWAITES: 226, PACIFIC: 81}[path]  # README's counts
    url, access = str(path), {}
    if where == "s3":
        url = real_s3[path]
        access = {"credentials": moto_server.credentials, "endpoint": moto_server.endpoint}
    read = read_parents(url, parents, CONFIG, **access)
    for parent in parents:
        mine = oracle.points_in_parent(expected, parent)
        got = read.points[parent]
        order = np.lexsort((mine["h_li"].to_numpy(), mine["child"].to_numpy()))
        got_order = np.lexsort((got.columns["h_li"], got.child_index))
        np.testing.assert_array_equal(got.child_index[got_order], mine["child"].to_numpy()[order])
        for name in ("h_li", "h_li_sigma"):
            np.testing.assert_array_equal(
                got.columns[name][got_order], mine[name].to_numpy()[order]
            )
    assert sum(len(p) for p in read.points.values()) == len(expected)


# -- another product is refused by name --------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_real_atl07_file_is_refused_by_name(where, real_s3, moto_server):
    url, access = str(ATL07), {}
    if where == "s3":
        url = real_s3[ATL07]
        access = {"credentials": moto_server.credentials, "endpoint": moto_server.endpoint}
    with pytest.raises(GranuleReadError) as caught:
        read_parents(url, parents_of([THWAITES]), CONFIG, **access)
    assert caught.value.url == url
    assert caught.value.reason == "not ATL06 but another product: its short_name says ATL07"


def test_an_extract_of_the_atl07_file_records_why_it_has_no_points(real_s3, s3_env):
    """The production extract (local, Lambda and ECS alike): a failed record naming it."""
    request = ExtractRequest(
        granule_url=real_s3[ATL07],
        parents=tuple(parents_of([THWAITES])),
        store_path=f"s3://{BUCKET}/extract.zarr",
        parent_order=6,
        child_order=12,
    )
    result = extract_granule(request, endpoint=s3_env.endpoint)
    assert result.status == "failed" and result.points == 0
    assert result.reason == "not ATL06 but another product: its short_name says ATL07"
    stored = stored_extract(request)
    assert stored is not None and stored.status == "failed" and stored.reason == result.reason


def test_a_file_without_the_beam_groups_is_refused_even_unlabelled(tmp_path):
    """An ATL08-shaped file (``gt1l/land_segments``) with no ``short_name`` at all."""
    path = tmp_path / "ATL08_20181015100401_02560110_006_01.h5"
    with h5py.File(path, "w") as f:
        for beam in oracle.BEAMS:
            g = f.create_group(f"{beam}/land_segments")
            g.create_dataset("latitude", data=np.array([-75.0, -75.1]))
            g.create_dataset("longitude", data=np.array([-107.0, -107.1]))
    with pytest.raises(GranuleReadError) as caught:
        read_parents(str(path), parents_of([THWAITES]), CONFIG)
    assert caught.value.reason == (
        "not ATL06: none of the beams gt1l, gt1r, gt2l, gt2r, gt3l, gt3r has the group "
        "{beam}/land_ice_segments (its short_name is not stated)"
    )


def test_an_atl06_shaped_file_whose_short_name_says_atl08_is_refused(tmp_path):
    copy_path = tmp_path / mirror_name(THWAITES)
    shutil.copy(THWAITES, copy_path)
    with h5py.File(copy_path, "r+") as f:
        f.attrs["short_name"] = np.bytes_(b"ATL08")
    with pytest.raises(GranuleReadError, match="another product: its short_name says ATL08$"):
        read_parents(str(copy_path), parents_of([THWAITES]), CONFIG)


# -- CMR records: names and links --------------------------------------------------------------


def real_ecs_record() -> dict:
    """The real NSIDC_ECS ATL06 V005 record, as CMR's ``granules.umm_json`` served it."""
    return json.loads(ECS_RECORD.read_text())["items"][0]


def with_footprint_and_s3(record: dict, s3_type: str) -> dict:
    """The record with the polygon CMR computed for it (its ECHO feed, same granule) and an
    ``s3://`` URL listed under ``s3_type``, as NSIDC_CPRD records list theirs."""
    record = copy.deepcopy(record)
    feed = json.loads(ECS_FEED.read_text())["feed"]["entry"][0]
    numbers = [float(v) for v in feed["polygons"][0][0].split()]
    points = [
        {"Latitude": la, "Longitude": lo}
        for la, lo in zip(numbers[::2], numbers[1::2], strict=True)
    ]
    umm = record["umm"]
    umm["SpatialExtent"]["HorizontalSpatialDomain"]["Geometry"] = {
        "GPolygons": [{"Boundary": {"Points": points}}]
    }
    name = record_granule_name(record)
    umm["RelatedUrls"].append(
        {
            "URL": f"s3://nsidc-cumulus-prod-protected/ATLAS/ATL06/005/2019/02/21/{name}",
            "Type": s3_type,
        }
    )
    return record


def revision(record: dict, number: str, concept: str) -> dict:
    """Another revision of the record's acquisition, named as NSIDC_ECS names records."""
    record = copy.deepcopy(record)
    old = record_granule_name(record)
    new = old.replace("_01.h5", f"_{number}.h5")
    record["umm"]["DataGranule"]["Identifiers"][0]["Identifier"] = new
    record["umm"]["GranuleUR"] = record["meta"]["native-id"] = f"SC:ATL06.005:{concept}"
    record["meta"]["concept-id"] = f"G{concept}-NSIDC_ECS"  # another granule, another record
    for link in record["umm"]["RelatedUrls"]:
        link["URL"] = link["URL"].replace(old, new)
    return record


@pytest.fixture
def fake_cmr():
    fake = FakeCmr().start()
    yield fake
    fake.stop()


def test_a_real_ecs_record_is_named_by_its_file_through_cmr(fake_cmr):
    """``GranuleUR`` is ``SC:ATL06.005:228825416``: the cycle is read from the file name."""
    record = real_ecs_record()
    assert record["umm"]["GranuleUR"] == "SC:ATL06.005:228825416"
    fake_cmr.items = [record]
    catalog = build_catalog(
        cycle=2, region="greenland", version="005", provider="NSIDC_ECS", cmr_url=fake_cmr.url
    )
    # No s3:// URL in this on-premises record: reported by its file name, in cycle 2.
    assert [(r.name, r.problem) for r in catalog.report] == [
        ("ATL06_20190221121851_08410203_005_01.h5", "no_s3_url")
    ]
    assert catalog.metadata["counts"]["other_cycle"] == 0
    other = catalog_from_records([record], region="greenland", cycle=3)
    assert other.report == () and other.metadata["counts"]["other_cycle"] == 1


@pytest.mark.parametrize("s3_type", ["GET DATA", "GET DATA VIA DIRECT ACCESS"])
def test_real_records_revisions_and_duplicates_go_by_file_name(fake_cmr, s3_type):
    """Two revisions and a second record of one of them, each named only ``SC:…``."""
    first = with_footprint_and_s3(real_ecs_record(), s3_type)
    second = revision(first, "02", "228825999")
    again = copy.deepcopy(second)
    again["meta"]["concept-id"] = "G2159085999-NSIDC_ECS"
    fake_cmr.items = [second, first, again]
    catalog = build_catalog(
        cycle=2, region="greenland", version="005", provider="NSIDC_ECS", cmr_url=fake_cmr.url
    )
    names = {g.name for granules in catalog.cells.values() for g in granules}
    assert names == {"ATL06_20190221121851_08410203_005_02.h5"}
    assert catalog.cells and all(
        g.s3.endswith("/ATL06_20190221121851_08410203_005_02.h5")
        for granules in catalog.cells.values()
        for g in granules
    )
    assert [(r.name, r.problem) for r in catalog.report] == [
        ("ATL06_20190221121851_08410203_005_01.h5", "superseded")
    ]
    assert catalog.metadata["counts"]["duplicates"] == 1
    # A mirror holds the files under their names: the plan reads them there.
    requests = plan_cells(catalog, CONFIG, "s3://out/x.zarr", granule_mirror="s3://mirror/atl06")
    assert {url for r in requests for url in r.granule_urls} == {
        "s3://mirror/atl06/ATL06_20190221121851_08410203_005_02.h5"
    }


# -- the command line on the real granules, every level against the oracle --------------------


def region_around(paths, directory: Path) -> Path:
    """A GeoJSON MultiPolygon: a box around each granule's points (the granules lie far apart)."""
    boxes = []
    for path in paths:
        points = oracle.good_points([path])
        lo, la = points["longitude"], points["latitude"]
        w, e, s, n = lo.min() - 1, lo.max() + 1, la.min() - 1, la.max() + 1
        boxes.append([[[w, s], [e, s], [e, n], [w, n], [w, s]]])
    path = directory / "region.geojson"
    path.write_text(json.dumps({"type": "MultiPolygon", "coordinates": boxes}))
    return path


def record_of(path: Path) -> dict:
    """A CMR record for a real granule (these have none): its name, a box around every row
    of every beam as footprint, and its own start and end times."""
    lats, lons = [], []
    with h5py.File(path, "r") as f:
        for beam in oracle.BEAMS:
            if f"{beam}/land_ice_segments" in f:
                lats.append(f[f"{beam}/land_ice_segments/latitude"][:])
                lons.append(f[f"{beam}/land_ice_segments/longitude"][:])
        begin, end = utc_attribute(f, "data_start_utc"), utc_attribute(f, "data_end_utc")
    lat, lon = np.concatenate(lats), np.concatenate(lons)
    w, e, s, n = lon.min() - 0.5, lon.max() + 0.5, lat.min() - 0.5, lat.max() + 0.5
    ring = [(w, s), (e, s), (e, n), (w, n), (w, s)]
    ring = [tuple(map(float, p)) for p in ring]
    return umm_item(mirror_name(path), ring, begin, end, version=release_of(path))


def release_of(path: Path) -> str:
    """The release in the granule's name (``003``, ``209``): the CMR collection's version."""
    return mirror_name(path).split("_")[3]


def test_the_cli_grids_the_real_granules_as_the_oracle_does(
    fake_cmr, prefect_server, tmp_path, capsys
):
    mirror = tmp_path / "granules"
    mirror.mkdir()
    for path in GRANULES:
        shutil.copy(path, mirror / mirror_name(path))
    fake_cmr.items = [record_of(path) for path in GRANULES]
    region = region_around(GRANULES, tmp_path)
    for path, good in zip(GRANULES, (226, 81), strict=True):
        # One release per catalog (the two files are releases 003 and 209).
        catalog_file = tmp_path / f"catalog-{release_of(path)}.json"
        assert (
            main(
                ["catalog", "--start-date", "2018-10-13", "--end-date", "2018-10-15"]
                + ["--product-version", release_of(path)]
                + ["--region", str(region), "--cmr-url", fake_cmr.url, "-o", str(catalog_file)]
            )
            == 0
        )
        catalog = load_catalog(catalog_file)
        assert catalog.granule_count == 1
        assert catalog.report == ()
        store = tmp_path / f"real-{release_of(path)}.zarr"
        code = main(
            ["run", "--catalog", str(catalog_file), "--store", str(store)]
            + ["--credentials", "none", "--granule-mirror", str(mirror)]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert set(parents_of([path])) <= {int(p) for p in catalog.parents}
        for order in ORDERS:
            arrays = level_arrays(str(store), order)
            expected = oracle.reference_level([path], catalog.parents, order)
            assert_level_equals(arrays, expected, order)
            assert_cell_ids(arrays, catalog.parents, order)
        assert int(level_arrays(str(store), 12)["count"].sum()) == good
