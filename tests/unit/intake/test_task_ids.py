import time
import uuid

from gpuqueue.store.task_ids import issued_at, new_task_id


def test_task_ids_are_version_7_uuids_carrying_their_issue_time():
    task_id = new_task_id(1_800_000_000.123)
    parsed = uuid.UUID(task_id)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert issued_at(task_id) == 1_800_000_000.123


def test_ids_issued_together_are_distinct_and_sort_by_time():
    now = time.time()
    same_ms = {new_task_id(now) for _ in range(5000)}
    assert len(same_ms) == 5000
    assert new_task_id(now) < new_task_id(now + 0.002)


def test_other_ids_have_no_issue_time():
    assert issued_at(str(uuid.uuid4())) is None
    assert issued_at("not-a-uuid") is None
    assert issued_at("../../etc/passwd") is None
