"""Benchmarks: programs, not tests. Run them with `make bench` or `python bench/run.py [NAME]`."""
