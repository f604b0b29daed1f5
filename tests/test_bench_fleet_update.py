"""The pure helpers of the fleet-wide update benchmark (bench/fleet_update.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bench.fleet_update import durations_for, first_waves, ideal_end, lead_for, times_for

T = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)


def test_the_update_time_is_the_first_whole_minute_that_leaves_the_downloads_their_time_before_the_lead() -> None:
    download_at, run_at = times_for(T + timedelta(seconds=10, microseconds=5), 20.4, 30.0, timedelta(seconds=60))
    assert download_at == T + timedelta(seconds=31)  # setup's estimate, rounded up to a whole second
    assert run_at == T + timedelta(minutes=3)  # 08:02:01 at the earliest: the next whole minute
    assert run_at - download_at >= timedelta(seconds=90)


def test_an_update_time_that_falls_on_a_whole_minute_is_kept() -> None:
    download_at, run_at = times_for(T, 30.0, 30.0, timedelta(seconds=60))
    assert (download_at, run_at) == (T + timedelta(seconds=30), T + timedelta(minutes=2))


def test_the_first_wave_of_each_plan_is_its_nodes_at_its_earliest_time() -> None:
    at = T + timedelta(minutes=5)
    entries = [
        (1, "a1", at), (1, "a2", at), (1, "a3", at + timedelta(seconds=30)), (1, "a4", at + timedelta(seconds=30)),
        (2, "b1", at + timedelta(seconds=30)), (2, "b2", at + timedelta(seconds=60)),  # moved: its first is later
    ]  # fmt: skip
    assert first_waves(entries) == {"a1", "a2", "b1"}
    assert first_waves([]) == set()


def test_the_ideal_is_the_latest_planned_time_plus_that_nodes_install() -> None:
    starts = {"a": T, "b": T + timedelta(seconds=30), "s": T}
    assert ideal_end(starts, {"a": 14.0, "b": 5.0, "s": 20.0}) == T + timedelta(seconds=35)


def test_install_durations_are_the_same_draws_each_run_within_bounds() -> None:
    hosts = [f"f{i:05d}" for i in range(100)]
    first = durations_for(hosts)
    assert first == durations_for(hosts)
    assert all(5.0 <= d <= 15.0 for d in first.values())


def test_the_lead_grows_with_the_clusters_in_half_minutes_from_a_minute() -> None:
    assert lead_for(8) == lead_for(400) == timedelta(seconds=60)
    assert lead_for(401) == timedelta(seconds=90)
    assert lead_for(500) == timedelta(seconds=90)  # issue 16's 2,500 nodes
    assert lead_for(2000) == timedelta(seconds=300)  # its 10,000
