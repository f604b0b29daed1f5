"""The fleet: clusters and nodes, as last reported by their agents."""

from __future__ import annotations

from datetime import timedelta

from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.urls import reverse

hostname_validator = RegexValidator(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
    "Use a host name: lower-case letters, digits and hyphens, at most 63 characters.",
)


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

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=models.Q(max_parallel_updates__gte=1), name="cluster_cap_at_least_one")
        ]

    def __str__(self) -> str:
        return self.name


class Node(models.Model):
    class State(models.TextChoices):
        UNKNOWN = "unknown", "Unknown (never reported)"
        ONLINE = "online", "Online"
        UPDATING = "updating", "Updating"
        REBOOTING = "rebooting", "Rebooting"

    class Channel(models.TextChoices):
        STABLE = "stable", "Stable"
        OLDSTABLE = "oldstable", "Oldstable"

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
    # When the node took the snapshot stored above: reports processed out of order
    # (several control processes) must not put older state over newer.
    reported_at = models.DateTimeField(null=True, blank=True, editable=False)
    state = models.CharField(max_length=16, choices=State.choices, default=State.UNKNOWN, editable=False)
    maintenance_mode = models.BooleanField(default=False, editable=False)
    maintenance_reason = models.CharField(max_length=200, blank=True, editable=False)
    # The manual's "warning flag": set when a scheduled download has failed 10 times,
    # cleared only by a complete, verified download. Never removed by hand.
    download_warning = models.BooleanField(default=False, editable=False)
    download_warning_since = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["hostname"]
        permissions = [
            ("start_update", "Can start updates"),
            ("remove_update_lock", "Can remove update locks"),
            ("end_maintenance", "Can end maintenance mode"),
        ]

    def __str__(self) -> str:
        return self.hostname

    def get_absolute_url(self) -> str:
        return reverse("admin:nodes_node_change", args=[self.pk])

    @property
    def queue(self) -> str:
        """The Celery queue this node's agent consumes, and nobody else."""
        return f"node.{self.hostname}"
