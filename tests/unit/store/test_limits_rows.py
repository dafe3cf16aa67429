"""The limits table's row types: no two can ever read or write each other's rows."""

from __future__ import annotations

from itertools import permutations

from gpuqueue.store.limits_rows import LimitsRow


def test_every_row_type_has_its_own_prefix() -> None:
    prefixes = [row.value for row in LimitsRow]
    assert len(set(prefixes)) == len(prefixes)


def test_no_prefix_starts_another() -> None:
    clashes = [(a.name, b.name) for a, b in permutations(LimitsRow, 2) if b.startswith(a)]
    assert clashes == []


def test_prefixes_end_their_type_name_with_a_hash() -> None:
    # What keeps a row's subject from running into the type's name: "rate" + "#x" is never
    # another type's key, whatever the subject.
    for row in LimitsRow:
        name, hash_, rest = row.value.partition("#")
        assert name, row.name
        assert hash_, row.name
        assert not rest, row.name


def test_no_prefix_can_start_an_idempotency_record() -> None:
    # Powertools keys the records "<function name>.<function>#<hash>": the part before the
    # first "#" has a ".", which no prefix's has.
    record = "gpuqueue-SubmitFunction-Ab12.run#0123abcd"
    assert [row.name for row in LimitsRow if "." in row.value or record.startswith(row)] == []


def test_a_key_is_the_prefix_then_the_subject() -> None:
    assert LimitsRow.ACTIVE_SHARE.key("alice") == "active#alice"
    assert LimitsRow.LANE.key("high") == "lane#high"
