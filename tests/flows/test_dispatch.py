"""A group's outcome: every item reported, and retried only when an item may pass."""

from __future__ import annotations

import pickle

import obstore.exceptions as obstore_errors
import pytest

from magg.tasks.dispatch import group_outcome, in_groups
from magg_core.errors import (
    CellTimeoutError,
    GroupFailedError,
    GroupInterruptedError,
    is_transient,
)
from magg_core.schema import CellResult
from tests.test_errors import client_error

DONE = [CellResult(parent_morton=p, status="ok", granule_count=1) for p in (11, 12)]


def test_a_complete_group_returns_its_results():
    assert group_outcome(DONE, {}, [], 2) == DONE


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (client_error("SlowDown", 503), True),  # throttled
        (client_error("InternalError", 500), True),
        (CellTimeoutError("cell 13 passed its deadline"), True),
        (
            obstore_errors.GenericError(
                "Generic S3 error: status code: 503, <Code>SlowDown</Code>"
            ),
            True,
        ),
        (obstore_errors.PermissionDeniedError("status code: 400 <Code>ExpiredToken</Code>"), True),
        (client_error("AccessDenied", 403), False),  # the store's policy refuses the write
        (obstore_errors.NotFoundError("not found"), False),
    ],
    ids=["503-SlowDown", "500", "deadline", "obstore-503", "obstore-expired", "403", "404"],
)
def test_a_group_with_a_raised_item_carries_every_outcome(error, retried):
    with pytest.raises(GroupInterruptedError if retried else GroupFailedError) as caught:
        group_outcome(DONE, {13: error}, [], 3)

    assert is_transient(caught.value) is retried  # what the tasks' retry condition asks
    assert caught.value.results == DONE  # the completed items are reported, not lost
    assert set(caught.value.failures) == {13}
    assert type(error).__name__ in caught.value.failures[13]
    copy = pickle.loads(pickle.dumps(caught.value))  # as Prefect persists a failed state
    assert (copy.results, copy.failures) == (caught.value.results, caught.value.failures)


def test_a_group_with_an_incomplete_cell_is_not_retried_unless_another_item_may_pass():
    partial = CellResult(parent_morton=14, status="partial", granule_count=2)
    with pytest.raises(GroupFailedError) as caught:
        group_outcome([*DONE, partial], {}, ["cell 14 partial"], 3)
    assert "cell 14 partial" in str(caught.value) and caught.value.results[-1] is partial

    with pytest.raises(GroupInterruptedError):
        group_outcome([*DONE, partial], {15: client_error("SlowDown", 503)}, ["cell 14"], 4)


@pytest.mark.parametrize(
    ("items", "runs", "sizes"),
    [(0, 32, []), (5, 32, [1] * 5), (32, 32, [1] * 32), (33, 32, [2] * 16 + [1]), (6, 3, [2] * 3)],
)
def test_groups_keep_the_order_and_are_at_most_task_runs(items, runs, sizes):
    groups = in_groups(list(range(items)), runs)
    assert [i for g in groups for i in g] == list(range(items))
    assert [len(g) for g in groups] == sizes
