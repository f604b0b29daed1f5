"""The fleet: clusters and nodes, as last reported by their agents."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Exists, OuterRef
from django.urls import reverse
from django.utils.functional import cached_property

from agent.shared.protocol import HOSTNAME_RE, HOSTNAME_RULE, node_queue

hostname_validator = RegexValidator(HOSTNAME_RE, f"Use {HOSTNAME_RULE}.")


class Channel(models.TextChoices):
    """The release channels (agent.shared.protocol.CHANNELS), for nodes and releases alike."""

    STABLE = "stable", "Stable"
    OLDSTABLE = "oldstable", "Oldstable"


class Cluster(models.Model):
    name = models.CharField(max_length=63, unique=True, validators=[hostname_validator])
    max_parallel_updates = models.PositiveSmallIntegerField(
        default=1,
        validators=[MinValueValidator(1)],
        help_text="How many nodes of this cluster may be updating at the same time.",
    )
    lb_lead_time = models.DurationField(
        "load-balancer lead time",
        default=timedelta(hours=1),
        help_text="How long before its update a node leaves the load balancer.",
    )
    max_out_of_lb = models.PositiveSmallIntegerField(
        "max out of load balancer",
        null=True,
        blank=True,
        help_text="How many nodes may be out of the load balancer at once (waiting for their update time, "
        "updating, or on their way back). Empty: twice the parallel updates.",
    )
    expected_update = models.DurationField(
        "expected update duration",
        default=timedelta(minutes=30),
        help_text="From logging users off to back in service, for planning nodes that have no successful "
        "update to learn from (those plan with the median of their last three).",
    )

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=models.Q(max_parallel_updates__gte=1), name="cluster_cap_at_least_one")
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def out_of_lb_bound(self) -> int:
        """The bound on nodes out of the load balancer at once (max_out_of_lb, or its default)."""
        return self.max_out_of_lb or 2 * self.max_parallel_updates

    def clean(self) -> None:
        if self.max_out_of_lb is not None and self.max_out_of_lb < (self.max_parallel_updates or 1):
            raise ValidationError(
                {"max_out_of_lb": "At least as many as may update at once: a node leaves the load balancer before "
                 "it updates."}
            )  # fmt: skip
        if self.lb_lead_time is not None and self.lb_lead_time < timedelta(0):
            raise ValidationError({"lb_lead_time": "A lead time cannot be negative."})
        if self.expected_update is not None and self.expected_update <= timedelta(0):
            raise ValidationError({"expected_update": "Use a positive duration, e.g. 00:30:00."})


def _has_running_run() -> Exists:
    from updates.models import UpdateRun  # the updates app builds on this one: imported when used

    return Exists(UpdateRun.objects.running().filter(node=OuterRef("pk")))


class NodeQuerySet(models.QuerySet["Node"]):
    def with_status(self) -> NodeQuerySet:
        """Each node with what its status needs (see Node.status) in the same query:
        the annotation fills Node.updating."""
        return self.annotate(updating=_has_running_run())  # type: ignore[no-redef]  # fills the cached_property

    def in_status(self, status: str) -> NodeQuerySet:
        """The nodes whose Node.status is `status`."""
        if status == Node.Status.NEVER_REPORTED:
            return self.filter(last_seen__isnull=True)
        reported = self.filter(last_seen__isnull=False)
        return (
            reported.filter(_has_running_run())
            if status == Node.Status.UPDATING
            else reported.exclude(_has_running_run())
        )


class Node(models.Model):
    Channel = Channel

    class Status(models.TextChoices):
        NEVER_REPORTED = "never_reported", "Never reported"
        UPDATING = "updating", "Updating"
        ONLINE = "online", "Online"

    hostname = models.CharField(max_length=63, unique=True, validators=[hostname_validator])
    cluster = models.ForeignKey(
        Cluster,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="nodes",
        help_text="Empty for a single system.",
    )
    channel = models.CharField(max_length=16, choices=Channel.choices, default=Channel.STABLE)
    # Reported by the node agent; the control plane never invents these.
    installed_version = models.CharField(max_length=32, blank=True, editable=False)
    installed_packages = models.JSONField(default=dict, blank=True, editable=False)
    logged_in_users = models.JSONField(default=list, blank=True, editable=False)
    logon_enabled = models.BooleanField(default=True, editable=False)
    in_load_balancer = models.BooleanField(default=False, editable=False)
    boot_id = models.CharField(max_length=64, blank=True, editable=False)
    agent_instance = models.CharField(max_length=64, blank=True, editable=False)
    # The agent instance whose worker has reported itself: it consumes. The supervisor
    # reports a new instance (and a new boot) as soon as it starts the worker, which
    # then takes a second or more to take work.
    worker_instance = models.CharField(max_length=64, blank=True, editable=False)
    last_seen = models.DateTimeField(null=True, blank=True, editable=False)
    # When the control plane stored the snapshot above (its own clock: a node's clock
    # ahead or behind changes nothing), and that snapshot's place in the node's signed
    # sequence: reports processed out of order (several control processes) never put
    # older state over newer, and a replayed report is older than the last one stored.
    reported_at = models.DateTimeField(null=True, blank=True, editable=False)
    report_seq = models.PositiveBigIntegerField(default=0, editable=False)
    # What the appliance itself says about its maintenance mode (None: not reported).
    # maintenance_mode below is the control plane's decision; the two differ while a
    # step that switches it is under way, or when an appliance was changed by hand.
    reported_maintenance = models.BooleanField(null=True, editable=False)
    # The control plane's decision: on from an update's start until it succeeds or an operator ends it.
    maintenance_mode = models.BooleanField(default=False, editable=False)
    maintenance_reason = models.CharField(max_length=200, blank=True, editable=False)
    # The manual's "warning flag": set when a scheduled download has failed 10 times,
    # cleared only by a complete, verified download. Never removed by hand.
    download_warning = models.BooleanField(default=False, editable=False)
    download_warning_since = models.DateTimeField(null=True, blank=True, editable=False)

    objects = NodeQuerySet.as_manager()

    class Meta:
        ordering = ["hostname"]
        permissions = [
            ("start_update", "Can start updates"),
            ("remove_update_lock", "Can remove update locks"),
            ("end_maintenance", "Can end maintenance mode"),
            ("manage_node_keys", "Can accept, re-key and revoke node keys"),
            # /metrics for a monitoring user (basic auth) instead of the bearer token: updates/metrics_view.py.
            ("scrape_metrics", "Can read the Prometheus metrics (/metrics)"),
        ]

    def __str__(self) -> str:
        return self.hostname

    def get_absolute_url(self) -> str:
        return reverse("admin:nodes_node_change", args=[self.pk])

    @property
    def queue(self) -> str:
        """The Celery queue this node's agent consumes, and nobody else."""
        return node_queue(self.hostname)

    # Derived, never stored: whether a run is running is the runs' to say.
    # Node.objects.with_status() annotates it for a list (the annotation takes the
    # place of this property).
    @cached_property
    def updating(self) -> bool:
        from updates.models import UpdateRun

        return UpdateRun.objects.running().filter(node=self).exists()

    @property
    def status(self) -> str:
        if self.last_seen is None:
            return self.Status.NEVER_REPORTED
        return self.Status.UPDATING if self.updating else self.Status.ONLINE

    def get_status_display(self) -> str:
        return self.Status(self.status).label


class NodeKeyQuerySet(models.QuerySet["NodeKey"]):
    def accepted(self) -> NodeKeyQuerySet:
        return self.filter(state=NodeKey.State.ACCEPTED)

    def pending(self) -> NodeKeyQuerySet:
        return self.filter(state=NodeKey.State.PENDING)


class NodeKey(models.Model):
    """A node's public key, made on the node (`python -m agent enroll`) and offered by its
    agent. Nothing the node says is trusted until an operator (group `update`) accepts a
    key; accepting another replaces it, revoking it distrusts the node. Every key stays
    as history: who decided, when."""

    class State(models.TextChoices):
        PENDING = "pending", "Waiting for an operator"
        ACCEPTED = "accepted", "Accepted"
        REPLACED = "replaced", "Replaced by a newer key"
        REVOKED = "revoked", "Revoked"
        REJECTED = "rejected", "Rejected"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="keys")
    public_key = models.CharField(max_length=64)
    fingerprint = models.CharField(max_length=60, editable=False)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    offered_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    note = models.CharField(max_length=200, blank=True)

    objects = NodeKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-offered_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["node"], condition=models.Q(state="accepted"), name="one_accepted_key_per_node"
            ),
            models.UniqueConstraint(
                fields=["node"], condition=models.Q(state="pending"), name="one_pending_key_per_node"
            ),
            models.UniqueConstraint(fields=["node", "public_key"], name="a_key_once_per_node"),
        ]

    def __str__(self) -> str:
        return f"{self.node} {self.fingerprint} ({self.state})"
