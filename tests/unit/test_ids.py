from gateway.ids import ALPHABET, new_job_id


def test_ids_are_short_unique_and_sortable():
    ids = [new_job_id() for _ in range(5000)]
    assert len(set(ids)) == 5000
    assert ids == sorted(ids)
    assert all(len(i) == 11 and set(i) <= set(ALPHABET) for i in ids)


def test_time_order_across_processes_follows_the_clock():
    assert new_job_id(now_ms=1_800_000_000_000) < new_job_id(now_ms=1_800_000_000_001)
