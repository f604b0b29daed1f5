"""The agent's Celery app as the benchmarks run it: one worker process plays many
simulated nodes (bench/multinode.py), and the benchmark asks it over the broker
(Celery's ping) whether it consumes. Agents themselves run with remote control off
(agent/app.py); this switch exists here only."""

from agent.app import app

app.conf.worker_enable_remote_control = True

__all__ = ["app"]
