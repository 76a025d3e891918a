"""``process-cycle`` on the ``dask`` backend: a real ``dask.distributed`` cluster of processes.

The cluster is started by the test (scheduler and two single-threaded worker
processes on loopback), as an HPC user would with dask-jobqueue, and the run
is given only its scheduler's address. Granules and store are in moto S3.
"""

from __future__ import annotations

import numpy as np
import pytest
from distributed import LocalCluster

from magg.flows.process_cycle import process_cycle
from tests.flow_support import (
    ambient_s3,
    assert_store_matches_oracle,
    cell_task_runs,
    local_run_fixture,  # noqa: F401 - the shared ``local_run`` fixture
    store_arrays,
)


@pytest.fixture(scope="module")
def cluster(moto_server):
    """Workers see the S3 endpoint the way a cluster's machines see their environment."""
    with pytest.MonkeyPatch.context() as env:
        ambient_s3(env, moto_server)
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None,
        ) as cluster:  # fmt: skip
            yield cluster


def test_a_cycle_on_a_dask_cluster_equals_the_local_backend_and_the_oracle(
    local_run, cluster, moto_server, monkeypatch
):
    ambient_s3(monkeypatch, moto_server)
    moto_server.create_bucket("magg-dask-out")
    store = "s3://magg-dask-out/dask.zarr"

    state = process_cycle(
        catalog=str(local_run.sample.catalog_path),
        store=store,
        backend="dask",
        dask_address=cluster.scheduler_address,
        credentials="environment",
        granule_mirror=local_run.sample.mirror,
        return_state=True,
    )

    assert state.is_completed(), state.message
    local, remote = store_arrays(local_run.store), store_arrays(store)
    for name in local:
        np.testing.assert_array_equal(remote[name], local[name], err_msg=name)
    assert_store_matches_oracle(store, local_run.sample)
    runs = cell_task_runs(state.state_details.flow_run_id)
    assert len(runs) == len(local_run.sample.parents) and all(r.state.is_completed() for r in runs)
    summary = state.result()
    assert summary["granules_extracted"] == len(
        {g.name for gs in local_run.sample.catalog.cells.values() for g in gs}
    )
    # The work ran on the cluster: its scheduler saw every extract and every cell.
    seen = {n: p.state_counts["memory"] for n, p in cluster.scheduler.task_prefixes.items()}
    assert seen.get("extract_granule", 0) >= summary["granules_extracted"], seen
    assert seen.get("process_cells_within", 0) >= len(runs), seen


def test_backend_dask_without_an_address_is_refused(local_run):
    with pytest.raises(ValueError, match="dask_address"):
        process_cycle(
            catalog=str(local_run.sample.catalog_path),
            store="s3://magg-dask-out/none.zarr",
            backend="dask",
            credentials="none",
            granule_mirror=local_run.sample.mirror,
        )
