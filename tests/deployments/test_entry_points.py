"""Every entry point checks what the CLI checks (issue 17, §3).

The ECS flows (``process-cell``, ``extract-granule``) run here as Prefect
flows against a real Prefect test server, on moto S3, with the parameters a
caller who may create flow runs could write; the CLI runs in process. The
Lambda events are in ``tests/deployments/test_lambda.py`` (through the loopback Invoke
API and called as Lambda calls the handler); the shared check itself,
:func:`magg_core.schema.check_request`, is what all of them go through.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from magg.flows.cli import main
from magg.flows.extract_granule import extract_granule_flow
from magg.flows.process_cell import process_cell_flow
from magg_core.catalog.catalog import Catalog, CatalogGranule
from magg_core.config import load_config
from magg_core.grid.plan import PlanError, plan_cells
from magg_core.schema import CellRequest, ExtractRequest
from magg_core.store.arrays import create_template, open_store
from tests.flow_support import SAMPLE, sample_in_s3

IN, OUT = "magg-entry-in", "magg-entry-out"
STORE = f"s3://{OUT}/entry.zarr"


@pytest.fixture(scope="module")
def sample(moto_server, tmp_path_factory):
    sample = sample_in_s3(moto_server, tmp_path_factory.mktemp("entry"), IN, **SAMPLE)
    moto_server.create_bucket(OUT)
    store = open_store(STORE, credentials=moto_server.credentials, endpoint=moto_server.endpoint)
    create_template(store, load_config(), sample.parents, {"test": "entry points"})
    return sample


def _in_mirror(sample, parent: int) -> list[str]:
    return [f"{sample.mirror}/{g.name}" for g in sample.catalog.cells[parent]]


def _request(sample, store: str, **changes) -> CellRequest:
    parent = sample.parents[0]
    config = load_config()
    request = CellRequest(
        parent_morton=parent,
        parent_order=config.output.parent_order,
        child_order=config.output.child_order,
        granule_urls=tuple(_in_mirror(sample, parent)),
        store_path=store,
        chunk_idx=0,
    )
    return CellRequest(**{**request.__dict__, **changes})


def _extract(sample, store: str, **changes) -> dict:
    parent = sample.parents[0]
    request = ExtractRequest(
        granule_url=_in_mirror(sample, parent)[0],
        parents=(parent,),
        store_path=store,
        parent_order=6,
        child_order=12,
    )
    return {**request.to_event(include_credentials=False), **changes}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def local_store(tmp_path) -> tuple[str, Path]:
    """A local store with a valid template: only the entry point's rule stands in the way."""
    path = tmp_path / "local.zarr"
    return str(path), path


@pytest.mark.parametrize("spelling", ["path", "file-url"])
def test_an_ecs_child_writes_no_local_store(sample, s3_env, prefect_server, local_store, spelling):
    url, path = local_store
    create_template(open_store(url), load_config(), sample.parents, {"test": "local"})
    before = _files(path)
    named = url if spelling == "path" else path.as_uri()

    cell = process_cell_flow(
        _request(sample, named).to_event(include_credentials=False), return_state=True
    )
    extract = extract_granule_flow(_extract(sample, named), return_state=True)

    for state in (cell, extract):
        assert state.is_failed()
        assert f"store_path {named!r}" in state.message
        assert "is not accepted from a remote request" in state.message
    assert _files(path) == before


def test_an_ecs_child_keeps_to_the_allow_list_when_its_container_sets_one(
    sample, s3_env, prefect_server, monkeypatch
):
    monkeypatch.setenv("MAGG_ALLOWED_STORES", f"s3://{OUT}/elsewhere")
    state = process_cell_flow(
        _request(sample, STORE).to_event(include_credentials=False), return_state=True
    )
    assert state.is_failed()
    assert "is not below a prefix allowed by MAGG_ALLOWED_STORES" in state.message

    monkeypatch.setenv("MAGG_ALLOWED_STORES", f"s3://{OUT}")
    state = process_cell_flow(
        _request(sample, STORE).to_event(include_credentials=False), return_state=True
    )
    assert state.is_completed(), state.message


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"parent_morton": "1"}, "parent_morton 1 is not a morton word"),
        ("twice", "again (granule_urls[0])"),
        ({"granule_urls": ["/etc/passwd"]}, "granule_urls[0]: scheme '' (a local path)"),
    ],
    ids=["not-a-cell", "granule-twice", "local-granule"],
)
def test_an_ecs_cell_checks_what_the_lambda_event_checks(
    sample, s3_env, prefect_server, change, says
):
    event = _request(sample, STORE).to_event(include_credentials=False)
    if change == "twice":
        first = event["granule_urls"][0]
        change = {"granule_urls": [first, "s3://another-bucket/" + first.rsplit("/", 1)[1]]}
    state = process_cell_flow({**event, **change}, return_state=True)
    assert state.is_failed() and says in state.message, state.message


def test_an_ecs_extract_checks_its_parents_at_the_order(sample, s3_env, prefect_server):
    parent = sample.parents[0]
    event = _extract(sample, STORE, parents=[str(parent), str(parent + 1)])
    state = extract_granule_flow(event, return_state=True)
    assert state.is_failed()
    assert f"parents[1] {parent + 1} is a morton word of order 7" in state.message


# -- the operator's mirror: never read outside it --------------------------------------


def _catalog_with(sample, name: str) -> Catalog:
    parent = sample.parents[0]
    granule = CatalogGranule(name=name, s3=f"s3://nsidc/{name}", https=None)
    return Catalog(metadata=sample.catalog.metadata, cells={parent: (granule,)})


@pytest.mark.parametrize(
    "name",
    ["..%2f..%2fsecret.h5", "%2e%2e", "/etc/passwd", "..", ".hidden.h5", "a b.h5", "x\u2215y.h5"],
)
def test_a_mirror_name_that_would_decode_outside_the_mirror_is_refused(sample, tmp_path, name):
    """A ``file://`` mirror URL is percent-decoded when read: ``..%2f`` is ``../``."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for given in (str(mirror), mirror.as_uri()):
        with pytest.raises(PlanError, match="is not a plain file name"):
            plan_cells(_catalog_with(sample, name), load_config(), STORE, granule_mirror=given)


def test_a_mirror_file_that_links_outside_the_mirror_is_refused(sample, tmp_path):
    mirror, outside = tmp_path / "mirror", tmp_path / "outside"
    mirror.mkdir()
    outside.mkdir()
    (outside / "ATL06_secret.h5").write_bytes(b"not for the cells")
    (mirror / "ATL06_secret.h5").symlink_to(outside / "ATL06_secret.h5")
    (mirror / "ATL06_inside.h5").symlink_to(mirror / "ATL06_real.h5")  # a link within is fine
    config = load_config()

    with pytest.raises(PlanError, match="is a link to a file outside the mirror"):
        plan_cells(
            _catalog_with(sample, "ATL06_secret.h5"), config, STORE, granule_mirror=str(mirror)
        )
    (request,) = plan_cells(
        _catalog_with(sample, "ATL06_inside.h5"), config, STORE, granule_mirror=str(mirror)
    )
    assert request.granule_urls == (f"{mirror}/ATL06_inside.h5",)


def test_the_cli_refuses_a_mirror_escape_in_one_line(sample, tmp_path, prefect_server, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    catalog = _catalog_with(sample, "..%2f..%2fetc%2fpasswd").write(tmp_path / "catalog.json")
    store = tmp_path / "out.zarr"
    args = ["run", "--catalog", str(catalog), "--store", str(store), "--credentials", "none"]

    assert main([*args, "--granule-mirror", mirror.as_uri()]) == 1

    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("magg run: error: catalog cell ")
    assert "'..%2f..%2fetc%2fpasswd' is not a plain file name" in err[-1]
    assert not store.exists()


def test_a_plan_of_a_cell_listing_one_granule_twice_is_refused(sample):
    """A catalog file listing a name twice is refused when loaded; one built in memory (from
    CMR) reaches the plan, whose requests go through the events' check."""
    parent = sample.parents[0]
    url = sample.catalog.cells[parent][0].s3
    name = url.rsplit("/", 1)[1]
    twice = (
        CatalogGranule(name=name, s3=url, https=None),
        CatalogGranule(name=name, s3=f"s3://another-bucket/{name}", https=None),
    )
    catalog = Catalog(metadata=sample.catalog.metadata, cells={parent: twice})
    message = f"granule_urls[1] is granule {name!r} again (granule_urls[0])"
    with pytest.raises(PlanError, match=re.escape(message)):
        plan_cells(catalog, load_config(), STORE)
