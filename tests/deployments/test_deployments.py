"""Deployments as users run them: real server, real CLI, real workers, the repo's prefect.yaml.

- The pull step finds the project from the checkout and from a regular install.
- End to end: ``process-cycle/ecs`` runs through a process worker on the
  sample, each cell a child run of ``process-cell/ecs`` (the ECS code path,
  its pool made a process pool by ``MAGG_CELL_POOL_TYPE=process``). The
  Earthdata login comes from the Secret block through the pull step, the
  NSIDC-style credentials from the loopback Earthdata fake, granules and
  store and result storage from moto S3. Two cells fail (their granules are
  missing from the mirror); after the granules arrive, the UI's Retry
  re-runs those two cells and nothing else, and the store equals the oracle.
- The Lambda deploy script creates, then updates, the function on moto's
  Lambda API with the settings the seed names.
- The layer build (network, slow): arm64/3.12 under Lambda's size limit, and
  the same requirements built for this machine run the handler in a sandbox
  whose only packages are the function zip and the layer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import boto3
import numpy as np
import pytest
import zarr
from packaging import tags

from deployments.aws import deploy as lambda_deploy
from deployments.aws.package import LAMBDA_UNZIPPED_LIMIT, build_function, build_layer
from magg_core.catalog.catalog import catalog_from_records
from magg_core.config import load_config
from magg_core.granules.sample import write_sample
from magg_core.store.arrays import open_store
from magg_core.store.records import read_records
from tests import oracle
from tests.deploy_support import ALL_DEPLOYMENTS, REPO_ROOT, PrefectServer, prefect_cli, worker
from tests.fakes.earthdata import FakeEarthdata

CYCLE = 22
STORE = f"s3://magg-deploy-output/atl06/cycle{CYCLE}.zarr"
MIRROR = "s3://magg-deploy-granules/ATL06"
RESULTS_BUCKET = "magg-deploy-results"
EDL_USER, EDL_PASSWORD = "magg-deployer", "deploy-test-password-do-not-log-5e2a"


def test_pull_step_finds_the_installed_project_wherever_it_is(tmp_path):
    """From the checkout (editable install), and from a copy installed elsewhere (the image)."""
    from deployments.steps import project_directory

    assert project_directory() == {"directory": str(REPO_ROOT)}
    # A regular install's layout (pyproject's package-dir): flows/ and tasks/ under magg/.
    site = tmp_path / "site-packages"
    for source, target in (
        ("magg", "magg"),
        ("flows", "magg/flows"),
        ("tasks", "magg/tasks"),
        ("deployments", "deployments"),
        ("magg_core", "magg_core"),
    ):
        shutil.copytree(REPO_ROOT / source, site / target)
    found = subprocess.run(
        [sys.executable, "-c", "from deployments.steps import project_directory as p; print(p())"],
        env={"PYTHONPATH": str(site), "PATH": ""},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == str({"directory": str(site / "magg")})
    assert (site / "magg/flows/process_cell.py").is_file()  # the entrypoint resolves there


# -- end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def earthdata(tmp_path_factory):
    """The Earthdata fake, or ``None`` where port 443 cannot be bound (not root)."""
    fake = FakeEarthdata(users={EDL_USER: EDL_PASSWORD})
    try:
        fake.start(tmp_path_factory.mktemp("earthdata"))
    except PermissionError:
        yield None
        return
    yield fake
    fake.stop()


def _sample(directory: Path):
    """The sample (4 cells) plus two single-cell granules far from it and each other."""
    main = write_sample(directory / "main", n_granules=4, extent_km=200)
    isolated = [
        write_sample(directory / f"isolated-{i}", n_granules=1, extent_km=20, centre=c, seed=3)[0]
        for i, c in enumerate([(-78.0, 40.0), (-72.0, -70.0)])
    ]
    return main, isolated


def test_cycle_on_workers_with_two_failed_cells_retried_from_the_ui(
    tmp_path, moto_server, earthdata
):
    main, isolated = _sample(tmp_path / "granules")
    granules = main + isolated
    catalog = catalog_from_records([g.umm for g in granules], cycle=CYCLE)
    catalog_path = catalog.write(tmp_path / "catalog.json")
    missing = {g.name for g in isolated}
    failing = {p for p, gs in catalog.cells.items() if {g.name for g in gs} <= missing}
    assert len(catalog.cells) == 6 and len(failing) == 2
    assert all(
        not ({g.name for g in gs} & missing) for p, gs in catalog.cells.items() if p not in failing
    )

    for bucket in ("magg-deploy-granules", "magg-deploy-output", RESULTS_BUCKET):
        moto_server.create_bucket(bucket)
    for g in main:  # the isolated granules are not in the mirror yet: their cells fail
        moto_server.client.upload_file(str(g.path), "magg-deploy-granules", f"ATL06/{g.name}")

    moto = moto_server.credentials
    aws = {
        "AWS_ACCESS_KEY_ID": moto.access_key_id,
        "AWS_SECRET_ACCESS_KEY": moto.secret_access_key,
        "AWS_DEFAULT_REGION": moto_server.endpoint.region,
        "AWS_REGION": moto_server.endpoint.region,
    }
    if earthdata is not None:
        login = {
            "REQUESTS_CA_BUNDLE": str(earthdata.ca_bundle),
            "MAGG_EDL_HOST": earthdata.host,
            "MAGG_S3CREDENTIALS_URL": earthdata.s3credentials_url,
            "NETRC": str(tmp_path / "no-netrc"),
        }
        credentials_mode = "earthdata"
    else:  # no port 443: the same path with the worker's AWS credentials
        login, credentials_mode = {}, "environment"

    server = PrefectServer(tmp_path, scheduler=False).start()
    try:
        setup = server.client_env(tmp_path / "setup-home")
        prefect_cli(["deployments/work-pools.sh"], {**setup, "MAGG_CELL_POOL_TYPE": "process"})
        secrets = {"EARTHDATA_USERNAME": EDL_USER, "EARTHDATA_PASSWORD": EDL_PASSWORD}
        prefect_cli(["python", "-m", "deployments.blocks", "earthdata"], {**setup, **secrets})
        prefect_cli(
            [
                "python", "-m", "deployments.blocks", "aws", "--keys-from-environment",
                "--region", moto_server.endpoint.region, "--endpoint-url", moto_server.url,
            ],
            {**setup, **aws},
        )  # fmt: skip
        prefect_cli(
            ["python", "-m", "deployments.blocks", "results", "--bucket", RESULTS_BUCKET], setup
        )
        prefect_cli(["prefect", "--no-prompt", "deploy", "--all"], setup)

        worker_env = server.client_env(
            tmp_path / "worker-home", AWS_ENDPOINT_URL_S3=moto_server.url, **aws, **login
        )
        parameters = {
            "catalog": str(catalog_path),
            "store": STORE,
            "granule_mirror": MIRROR,
            "credentials": credentials_mode,
            "concurrency": 6,
        }
        with (
            worker("magg-process", worker_env, tmp_path / "worker-process.log"),
            worker("magg-ecs", worker_env, tmp_path / "worker-cells.log"),
        ):
            run = ["prefect", "deployment", "run", "process-cycle/ecs"]
            started = prefect_cli([*run, "--params", json.dumps(parameters)], setup)
            parent_id = started.stdout.split("UUID:")[1].split()[0]
            first = server.wait_final(parent_id, timeout_s=420)
            assert first["state"]["type"] == "FAILED", first["state"]
            assert "2 of 6 cells incomplete" in first["state"]["message"]

            cells = server.flow_runs("process-cell/ecs")
            assert sorted(r["name"] for r in cells) == sorted(f"cell-{p}" for p in catalog.cells)
            failed = {r["name"] for r in cells if r["state"]["type"] == "FAILED"}
            assert failed == {f"cell-{p}" for p in failing}
            assert all(r["state"]["type"] == "COMPLETED" for r in cells if r["name"] not in failed)

            for g in isolated:  # the mirror catches up; Retry in the UI
                moto_server.client.upload_file(
                    str(g.path), "magg-deploy-granules", f"ATL06/{g.name}"
                )
            server.retry(parent_id)
            second = server.wait_final(parent_id, timeout_s=300, after=1)
            assert second["state"]["type"] == "COMPLETED", second["state"]
            assert second["run_count"] == 2

            rerun = server.flow_runs("process-cell/ecs")[len(cells) :]
            assert sorted(r["name"] for r in rerun) == sorted(failed)
            assert all(r["state"]["type"] == "COMPLETED" for r in rerun)

        records = read_records(
            open_store(STORE, credentials=moto, endpoint=moto_server.endpoint), load_config()
        )
        assert {p: r.result.status for p, r in records.items()} == dict.fromkeys(
            catalog.cells, "ok"
        )
        _assert_store_matches_oracle(STORE, moto_server, [g.path for g in granules])
        tables = server.api(
            "POST",
            "/artifacts/filter",
            json={
                "artifacts": {
                    "key": {"any_": ["magg-cells"]},
                    "flow_run_id": {"any_": [parent_id]},
                },
                "sort": "CREATED_DESC",
            },
        )
        statuses = [sorted(row["status"] for row in json.loads(t["data"])) for t in tables[::-1]]
        assert statuses == [["failed"] * 2 + ["ok"] * 4, ["ok"] * 6]  # the per-cell table

        runs = [server.flow_run(parent_id), *server.flow_runs("process-cell/ecs")]
        exposed = json.dumps([r["parameters"] for r in runs]) + json.dumps(
            [server.deployment(name) for name in ALL_DEPLOYMENTS]
        )
        exposed += "\n".join(server.logs([r["id"] for r in runs]))
        leaked = {EDL_PASSWORD, moto.secret_access_key} | (
            earthdata.secrets() if earthdata else set()
        )
        assert not [s for s in leaked if s in exposed]
        if earthdata is not None:
            assert earthdata.logins and earthdata.issued  # the block's login was used
    finally:
        server.stop()


def _assert_store_matches_oracle(url, moto_server, paths) -> None:
    """Every parent's chunk equals the independent oracle (fill values where it has no data)."""
    config = load_config()
    shift = 2 * (config.output.child_order - config.output.parent_order)
    store = open_store(url, credentials=moto_server.credentials, endpoint=moto_server.endpoint)
    group = zarr.open_group(store, path=str(config.output.child_order), mode="r")
    arrays = {name: array[:] for name, array in group.arrays()}
    expected = oracle.reference_statistics(paths)
    ids = arrays["cell_ids"].astype(np.int64)
    n = config.output.children_per_parent
    for start in range(0, ids.size, n):
        chunk = slice(start, start + n)
        parent_id = int(ids[start]) >> shift
        want = expected.pop(oracle.parent_morton(parent_id, config.output.parent_order), None)
        position = ids[chunk] - (parent_id << shift)
        for name in oracle.STATISTICS:
            got = arrays[name][chunk]
            if want is None:
                assert (got == 0).all() if name == "count" else np.isnan(got).all(), name
            else:
                np.testing.assert_allclose(
                    got, want[name][position], rtol=2e-6, equal_nan=True, err_msg=name
                )
    assert not expected, f"parents with data missing from the store: {sorted(expected)}"


# -- Lambda packaging and deployment ----------------------------------------------------


def test_function_zip_holds_the_handler_and_magg_core_only(tmp_path):
    built = build_function(tmp_path / "function.zip")
    names = zipfile.ZipFile(built.path).namelist()
    assert "deployments/aws/lambda_handler.py" in names
    assert "magg_core/configs/atl06.yaml" in names
    assert {n.split("/")[0] for n in names} == {"deployments", "magg_core"}
    assert {n for n in names if n.startswith("deployments/")} == {
        "deployments/__init__.py",
        "deployments/aws/__init__.py",
        "deployments/aws/lambda_handler.py",
    }
    assert not [n for n in names if "prefect" in n or "__pycache__" in n]


def test_lambda_deploy_creates_then_updates_the_function(tmp_path, moto_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.credentials.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.credentials.secret_access_key)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)  # only AWS_REGION, as in AWS
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_REGION", moto_server.endpoint.region)
    role = boto3.client("iam", region_name="us-east-1").create_role(
        RoleName="magg-lambda",
        AssumeRolePolicyDocument=(
            REPO_ROOT / "deployments/aws/iam/lambda-trust-policy.json"
        ).read_text(),
    )["Role"]["Arn"]
    moto_server.create_bucket("magg-deploy-artifacts")
    function = build_function(tmp_path / "function.zip")
    layer = tmp_path / "layer.zip"  # stand-in: the script uploads it without looking inside
    with zipfile.ZipFile(layer, "w") as z:
        z.writestr("python/placeholder.py", "")
    argv = [
        "--role-arn", role, "--artifact-bucket", "magg-deploy-artifacts",
        "--function-zip", str(function.path), "--layer-zip", str(layer),
        "--allowed-store", "s3://magg-output/atl06", "--allowed-store", "S3://magg-output/x/../y/",
    ]  # fmt: skip

    assert lambda_deploy.main(argv) == 0  # create
    assert lambda_deploy.main(argv) == 0  # update; the same layer build → the same version

    client = boto3.client("lambda", region_name=moto_server.endpoint.region)
    config = client.get_function_configuration(FunctionName="magg-process-cell")
    assert config["Runtime"] == "python3.12" and config["Architectures"] == ["arm64"]
    assert (config["MemorySize"], config["Timeout"]) == (2048, 720)
    assert config["Handler"] == "deployments.aws.lambda_handler.lambda_handler"
    digest = base64.b64encode(hashlib.sha256(function.path.read_bytes()).digest()).decode()
    assert config["CodeSha256"] == digest
    assert config["Environment"]["Variables"] == {
        "MAGG_ALLOWED_STORES": "s3://magg-output/atl06/,s3://magg-output/y/"
    }
    versions = client.list_layer_versions(LayerName="magg-layer-arm64")["LayerVersions"]
    assert len(versions) == 1
    assert [layer["Arn"] for layer in config["Layers"]] == [versions[0]["LayerVersionArn"]]
    assert versions[0]["CompatibleArchitectures"] == ["arm64"]


@pytest.mark.parametrize(
    ("allowed", "message"),
    [
        ([], "the following arguments are required: --allowed-store"),
        (["--allowed-store", "/local/stores"], "scheme '' is not s3"),
        (["--allowed-store", "s3://Not_A_Bucket/x"], "not a valid S3 bucket name"),
    ],
    ids=["missing", "local-path", "bad-bucket"],
)
def test_lambda_deploy_needs_valid_allowed_stores_before_touching_aws(
    allowed, message, monkeypatch, capsys
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens here
    argv = ["--role-arn", "arn:aws:iam::123456789012:role/r", "--artifact-bucket", "b"]
    with pytest.raises(SystemExit) as exited:
        lambda_deploy.main([*argv, *allowed])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def _pypi_reachable() -> bool:
    try:
        import httpx

        return httpx.head("https://pypi.org/simple/numpy/", timeout=10).status_code < 500
    except Exception:  # any network failure means: no network here
        return False


@pytest.mark.slow
def test_layer_builds_under_the_limit_and_runs_the_handler(tmp_path, moto_server):
    if not _pypi_reachable():
        pytest.skip("building the layer downloads wheels from PyPI, which is unreachable here")
    function = build_function(tmp_path / "function.zip")
    arm = build_layer(tmp_path / "layer-arm64.zip", function_bytes=function.unzipped_bytes)
    assert function.unzipped_bytes + arm.unzipped_bytes < LAMBDA_UNZIPPED_LIMIT
    names = zipfile.ZipFile(arm.path).namelist()
    assert any(n.startswith("python/numpy/") for n in names)
    assert any("aarch64" in n for n in names if n.endswith(".so"))
    assert not [n for n in names if n.split("/")[1].lower().startswith("prefect")]
    print(f"\nlayer for python3.12/arm64: {arm.describe()}")

    # The same requirements for this machine: import and run the handler with
    # nothing but the function and the layer on the path.
    host = build_layer(
        tmp_path / "layer-host.zip",
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        platforms=tuple(dict.fromkeys(t.platform for t in tags.sys_tags())),
        keep_tree=tmp_path / "layer",
    )
    assert host.unzipped_bytes > 0
    zipfile.ZipFile(function.path).extractall(tmp_path / "task")
    result = _run_in_sandbox(tmp_path, moto_server)
    assert result["statusCode"] == 200, result
    body = json.loads(result["body"])
    assert body["status"] == "ok" and body["total_obs"] > 0


SANDBOX = """
import json, sys
try:
    import prefect
except ImportError:
    pass
else:
    raise SystemExit("prefect is importable in the sandbox")
from deployments.aws.lambda_handler import lambda_handler
print(json.dumps(lambda_handler(json.loads(sys.stdin.read()), None)))
"""


def _run_in_sandbox(tmp_path: Path, moto_server) -> dict:
    """One cell through the handler in ``python -I -S`` with only task root + layer on the path."""
    from magg_core.grid.plan import plan_cells
    from magg_core.store.arrays import create_template

    granules = write_sample(
        tmp_path / "g", n_granules=1, extent_km=20, centre=(-78.0, 40.0), seed=3
    )
    catalog = catalog_from_records([g.umm for g in granules], cycle=CYCLE)
    config = load_config()
    store_path = "s3://magg-layer-test/cell.zarr"
    moto_server.create_bucket("magg-layer-test")
    moto_server.upload_dir(tmp_path / "g", "magg-layer-test", "granules")
    store = open_store(
        store_path, credentials=moto_server.credentials, endpoint=moto_server.endpoint
    )
    create_template(store, config, catalog.parents, {})
    [request] = plan_cells(
        catalog, config, store_path, max_cells=1, granule_mirror="s3://magg-layer-test/granules"
    )
    event = {**request.to_event(include_credentials=False), "s3_credentials": {
        "accessKeyId": moto_server.credentials.access_key_id,
        "secretAccessKey": moto_server.credentials.secret_access_key,
    }}  # fmt: skip
    path = [str(tmp_path / "task"), str(tmp_path / "layer" / "python")]
    code = f"import sys; sys.path[:0] = {path!r}\n" + SANDBOX
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        input=json.dumps(event),
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "AWS_ENDPOINT_URL_S3": moto_server.url,
            "AWS_ACCESS_KEY_ID": moto_server.credentials.access_key_id,
            "AWS_SECRET_ACCESS_KEY": moto_server.credentials.secret_access_key,
            "AWS_REGION": moto_server.endpoint.region,
            "MAGG_ALLOWED_STORES": "s3://magg-layer-test/",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
