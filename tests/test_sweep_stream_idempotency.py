"""The idempotency-key cleanup deletes in batches, oldest first, one statement and transaction each."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from allocation.api.shared.idempotency import idempotency_cleanup
from allocation.models import IdempotencyRecord

pytestmark = pytest.mark.django_db

NOW = timezone.now()


def records(old: int, recent: int) -> None:
    common = {
        "principal": "agent:x",
        "method": "POST",
        "path": "/p",
        "request_hash": "h",
        "response_status": 201,
    }
    IdempotencyRecord.objects.bulk_create(
        [
            IdempotencyRecord(
                key=f"old-{index}", created_at=NOW - dt.timedelta(hours=25, minutes=index), **common
            )
            for index in range(old)
        ]
        + [
            IdempotencyRecord(key=f"recent-{index}", created_at=NOW - dt.timedelta(hours=1), **common)
            for index in range(recent)
        ]
    )


def test_batches_of_two_delete_every_record_past_the_retention_and_keep_the_rest():
    records(old=7, recent=2)
    with CaptureQueriesContext(connection) as captured:
        assert idempotency_cleanup(now=NOW, batch_size=2) == 7
    deletes = [query for query in captured.captured_queries if query["sql"].startswith("DELETE")]
    assert len(deletes) == 4  # 2 + 2 + 2 + 1, each a statement of its own
    assert sorted(IdempotencyRecord.objects.values_list("key", flat=True)) == ["recent-0", "recent-1"]
    assert idempotency_cleanup(now=NOW, batch_size=2) == 0
