"""One compromised appliance does not own the fleet. Real Redis 7 with the broker
users applied, a real control worker on the control user, real agents on their node
users; the attacker holds one cluster node completely (its broker credentials and
its key) and uses nothing but a bare Celery app and a redis client. Every attack of
the issue fails, and the honest nodes of the same cluster update within their cap."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
import redis
from celery import Celery
from kombu import Queue

from agent.shared import signing
from agent.shared.protocol import NodeReport, Snapshot, StepReport
from tests.conftest import ROOT, ControlWorker, process_env, test_database_url, wait_for
from tests.test_broker_acl import broker as acl_broker  # noqa: F401  (its Redis 7 with the broker users)
from tests.test_broker_acl import needs_redis7, refused

pytestmark = [needs_redis7, pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(300)]


def attacker_says(key_file, hostname: str, kind: str, message: dict, seq: int) -> dict:
    """A message signed with the compromised node's own key, as its agent would sign."""
    key = signing.load_private(key_file)
    return signing.sign({"kind": kind, "signer": hostname, "seq": seq, "message": message}, key)


def test_a_compromised_node_cannot_touch_the_others_and_they_update_within_their_cap(
    acl_broker,  # noqa: F811  (the fixture imported above)
    demo_repo,
    make_node,
    start_agent,
    wait_run,
    logs_dir,
    state_dir,  # noqa: F811
):
    from nodes.models import Cluster, Node
    from updates.models import UpdateRun, UpdateStep

    broker, (repo, server) = acl_broker, demo_repo
    repo.import_releases()
    cluster = Cluster.objects.create(name=f"pwn{uuid.uuid4().hex[:6]}", max_parallel_updates=1)
    attacker, honest = make_node("evil", cluster=cluster), [make_node("ok", cluster=cluster) for _ in range(2)]
    broker.apply({n.hostname: cluster.name for n in (attacker, *honest)})
    broker.reset_log()
    control = ControlWorker(broker.url("control"), test_database_url(), logs_dir / "control-pwn.log")
    control.start()
    evil_url = broker.url(f"node-{attacker.hostname}")
    evil_redis = redis.Redis.from_url(evil_url)
    evil = Celery("evil", broker=evil_url, set_as_current=False, fixups=[])
    # Celery would declare the queue first (LLEN and binding SADDs), which a node user may not.
    evil.conf.update(broker_connection_retry_on_startup=False, task_default_queue="control",
                     task_queues=[Queue("control", no_declare=True)])  # fmt: skip
    evil_key = state_dir / attacker.hostname / "identity.key"
    try:
        for node in honest:
            # Steps of a second each: the victim's run is still going when the forgeries arrive.
            start_agent(
                node.hostname, repo_url=server.url, root=repo.root_file, REDIS_URL=broker.url(f"node-{node.hostname}"),
                TGP_SIM_STEP_SECONDS="1.0",
            )  # fmt: skip
        for node in honest:
            wait_for(lambda n=node: Node.objects.get(pk=n.pk).worker_instance, 60, f"the agent of {node}")
        env = process_env(broker.url("web"), DATABASE_URL=test_database_url())
        subprocess.run(
            [sys.executable, "manage.py", "autoupdate", *(n.hostname for n in honest), "--yes"], cwd=ROOT, env=env,
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        runs = [UpdateRun.objects.get(node=n) for n in honest]
        victim, victim_run = honest[0], runs[0]

        # The broker: another node's commands, the control queue's contents, the slots, remote control.
        refused(lambda: evil_redis.lrange(f"node.{victim.hostname}", 0, -1))
        refused(lambda: evil_redis.lpush(f"node.{victim.hostname}", b"{}"))
        refused(lambda: evil_redis.lrange("control", 0, -1))
        refused(lambda: evil_redis.hset(f"tgp:slots:{{{cluster.name}}}:holders", attacker.hostname, "1:0"))
        refused(lambda: evil_redis.hdel(f"tgp:slots:{{{cluster.name}}}:holders", victim.hostname))
        refused(lambda: evil.control.broadcast("shutdown", reply=False))
        refused(lambda: evil.control.add_consumer(f"node.{victim.hostname}", reply=False))

        # The control queue takes its pushes; the control plane trusts none of them.
        done = {"run": victim_run.pk, "step": "resume", "snapshot": None}
        evil.send_task("control.complete", args=(attacker_says(evil_key, attacker.hostname, "done", done, 1),))
        go = signing.sign({"kind": "go", "signer": "control", "run": victim_run.pk, "step": "complete"},
                          signing.Ed25519PrivateKey.generate())  # fmt: skip
        evil.send_task("control.complete", args=(go,))
        old = Snapshot(installed_version="2.2.0", boot_id="x", taken_at=time.time() + 86400)  # a clock a day ahead
        lie = NodeReport(victim.hostname, old).to_wire()
        evil.send_task("control.node_report", args=(attacker_says(evil_key, attacker.hostname, "node_report", lie, 2),))
        forged = signing.sign({**attacker_says(evil_key, attacker.hostname, "node_report", lie, 3)["body"],
                               "signer": victim.hostname}, signing.load_private(evil_key))  # fmt: skip
        evil.send_task("control.node_report", args=(forged,))
        failed = StepReport(run=victim_run.pk, step="download", event="failed", hostname=attacker.hostname, at=1.0)
        evil.send_task("control.record_step", args=(attacker_says(evil_key, attacker.hostname, "report",
                                                                  failed.to_wire(), 4),))  # fmt: skip
        slot = {"run": victim_run.pk, "step": "download", "snapshot": None}
        evil.send_task("control.slot", args=(attacker_says(evil_key, attacker.hostname, "done", slot, 5),))
        wait_for(lambda: "refused a hand-off to slot" in control.log_path.read_text(), 60, "the forgeries to be read")
        assert Node.objects.get(pk=victim.pk).boot_id != "x", "no forged report was stored"
        assert UpdateRun.objects.get(pk=victim_run.pk).state == "running", "nor did a forgery end or fail its run"

        for run in runs:
            wait_run(run, "succeeded", timeout=180)
    finally:
        control.stop()

    for node in honest:
        assert Node.objects.get(pk=node.pk).installed_version == "2.2.0"
    # Within the cap: no two honest nodes between drain and resume at once (their own times).
    spans = []
    for run in runs:
        steps = {s.name: s for s in UpdateStep.objects.filter(run=run)}
        spans.append((steps["drain"].started_at, steps["resume"].finished_at))
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    assert a_end <= b_start, f"two nodes of a cap-1 cluster out of service at once: {spans}"
    # Redis refused the attacker only, and nobody else anything.
    denials = broker.denials()
    assert denials and all(d.startswith(f"node-{attacker.hostname}:") for d in denials), denials
