"""`make bench`'s command line (bench/run.py): options reach the benchmarks that take them,
bad ones are refused before anything starts."""

from __future__ import annotations

import pytest

from bench.run import options, parse_args


def test_the_control_workers_pool_size_goes_to_the_fleet_benchmark() -> None:
    assert options(parse_args(["fleet", "--concurrency", "4", "--minutes", "1"])) == {"concurrency": 4, "minutes": 1.0}


@pytest.mark.parametrize("argv", [["fleet", "--concurrency", "0"], ["--minutes", "-1"], ["no-such-bench"]])
def test_a_bad_argument_is_refused_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err
