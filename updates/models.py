"""Releases, runs and their steps, locks and notices: the truth about every update."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models, transaction
from django.db.models import Case, Count, Exists, OuterRef, Q, Subquery, Value, When
from django.db.models.functions import Coalesce
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property

from agent.shared.protocol import (
    PACKAGE_NAME_RE,
    PACKAGE_NAME_RULE,
    SHA256_RE,
    VERSION_RE,
    VERSION_RULE,
    version_sort_key,
)
from nodes.models import Channel, Cluster, Node

version_validator = RegexValidator(VERSION_RE, f"Use {VERSION_RULE}.")
package_name_validator = RegexValidator(PACKAGE_NAME_RE, f"Use {PACKAGE_NAME_RULE}.")


class Release(models.Model):
    Channel = Channel

    version = models.CharField(max_length=32, unique=True, validators=[version_validator])
    version_sort = models.CharField(max_length=64, editable=False, db_index=True)
    channel = models.CharField(max_length=16, choices=Channel.choices, default=Channel.STABLE)
    notes = models.TextField(blank=True)
    needs_reboot = models.BooleanField(default=True)
    hotfix = models.BooleanField(default=False)
    index_serial = models.PositiveIntegerField(
        default=0, editable=False, help_text="Version of the signed targets metadata it came from."
    )
    # Set when an imported index no longer lists it (updates.releases.import_index),
    # cleared when one lists it again: never the newest, never installed.
    withdrawn_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When the repository's index stopped listing it."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-version_sort"]

    def __str__(self) -> str:
        return f"{self.version} ({self.channel})"

    def save(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.version_sort = version_sort_key(self.version)
        super().save(*args, **kwargs)

    @property
    def withdrawn_reason(self) -> str:
        return f"release {self.version} was withdrawn from the repository"

    @classmethod
    def newest(cls, channel: str) -> Release | None:
        """The newest release of the channel that the repository still lists."""
        return cls.objects.filter(channel=channel, withdrawn_at=None).order_by("-version_sort").first()


class Package(models.Model):
    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="packages")
    name = models.CharField(max_length=63, validators=[package_name_validator])
    version = models.CharField(max_length=32, validators=[version_validator])
    file = models.CharField(max_length=200)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64, validators=[RegexValidator(SHA256_RE, "64 hex digits.")])

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["release", "name"], name="one_package_name_per_release")]

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class RolloutProgress:
    """Where a rollout's runs stand, counted from them (never stored): `waiting` runs
    have not reached the point where they disrupt their node (UpdateRunQuerySet.unstarted),
    `running` ones have."""

    total: int
    done: int
    running: int
    waiting: int
    failed: int
    cancelled: int

    @property
    def finished(self) -> bool:
        return not (self.running or self.waiting)


PROGRESS_FIELDS = ("runs_total", "runs_done", "runs_active", "runs_waiting", "runs_failed", "runs_cancelled")


class RolloutQuerySet(models.QuerySet["Rollout"]):
    def with_progress(self) -> RolloutQuerySet:
        """Each rollout with the counts of its runs (Rollout.progress) in the same query."""
        runs = UpdateRun.State
        # Running runs are few (an index on state): the subquery stays small however many runs there were.
        waiting = Q(runs__in=UpdateRun.objects.running().unstarted().values("pk"))
        return self.annotate(
            runs_total=Count("runs"),
            runs_done=Count("runs", filter=Q(runs__state=runs.SUCCEEDED)),
            runs_active=Count("runs", filter=Q(runs__state=runs.RUNNING)),
            runs_waiting=Count("runs", filter=waiting),
            runs_failed=Count("runs", filter=Q(runs__state=runs.FAILED)),
            runs_cancelled=Count("runs", filter=Q(runs__state=runs.CANCELLED)),
        )


class Rollout(models.Model):
    """The runs of one start of several nodes (an operator's selection, a whole cluster)
    or of one occurrence of a cluster schedule, as one thing to watch, pause, resume or
    cancel. Its state changes in updates/runs/rollouts.py only (conditional UPDATEs);
    "finished" is not a state of its own: none of its runs is running (progress)."""

    class State(models.TextChoices):
        RUNNING = "running", "Running"
        # No node of it starts (passes the point where it disrupts its node); started ones finish.
        PAUSED = "paused", "Paused"
        # Its nodes that had not started were called off; started ones finish.
        CANCELLED = "cancelled", "Cancelled"

    class ThresholdUnit(models.TextChoices):
        COUNT = "count", "failed nodes"
        PERCENT = "percent", "% of its nodes failed"

    title = models.CharField(max_length=200)
    cluster = models.ForeignKey(
        Cluster, null=True, blank=True, on_delete=models.SET_NULL, related_name="rollouts",
        help_text="The cluster, when every node of it belongs to one.",
    )  # fmt: skip
    schedule = models.ForeignKey(
        "UpdateSchedule", null=True, blank=True, on_delete=models.SET_NULL, related_name="rollouts"
    )
    scheduled_for = models.DateTimeField(null=True, blank=True, help_text="The schedule's occurrence.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.RUNNING, editable=False)
    state_changed_at = models.DateTimeField(null=True, blank=True, editable=False)
    state_changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )
    state_reason = models.CharField(max_length=300, blank=True, editable=False)
    # hawkBit's error threshold: the first failure pauses it unless set otherwise.
    failure_threshold = models.PositiveSmallIntegerField(
        "pause after", default=1, validators=[MinValueValidator(1)],
        help_text="It pauses by itself once this many of its nodes failed (or this percentage of them).",
    )  # fmt: skip
    failure_threshold_unit = models.CharField(
        "unit", max_length=8, choices=ThresholdUnit.choices, default=ThresholdUnit.COUNT
    )

    objects = RolloutQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["schedule", "scheduled_for"],
                condition=Q(schedule__isnull=False),
                name="one_rollout_per_occurrence",
            ),
            models.CheckConstraint(
                condition=Q(failure_threshold__gte=1)
                & (Q(failure_threshold_unit="count") | Q(failure_threshold__lte=100)),
                name="rollout_threshold_in_range",
            ),
        ]

    def __str__(self) -> str:
        return f"rollout {self.pk}: {self.title}"

    def get_absolute_url(self) -> str:
        return reverse("admin:updates_rollout_change", args=[self.pk])

    def clean(self) -> None:
        if self.failure_threshold_unit == self.ThresholdUnit.PERCENT and (self.failure_threshold or 0) > 100:
            raise ValidationError({"failure_threshold": "A percentage of its nodes: at most 100."})

    @cached_property
    def progress(self) -> RolloutProgress:
        """Counted from its runs; Rollout.objects.with_progress() counts them in the list's query."""
        if "runs_total" not in self.__dict__:
            self.__dict__.update(Rollout.objects.with_progress().filter(pk=self.pk).values(*PROGRESS_FIELDS).get())
        total, done, active, waiting, failed, cancelled = (self.__dict__[name] for name in PROGRESS_FIELDS)
        return RolloutProgress(total, done, active - waiting, waiting, failed, cancelled)

    @property
    def shown_state(self) -> str:
        """Its state as the operator sees it: a running or paused rollout none of whose
        runs is running any more has finished."""
        if self.state != self.State.CANCELLED and self.progress.finished:
            return "finished"
        return str(self.state)

    def get_shown_state_display(self) -> str:
        return "Finished" if self.shown_state == "finished" else self.State(self.state).label

    def threshold_reached(self, failed: int, total: int) -> bool:
        if self.failure_threshold_unit == self.ThresholdUnit.PERCENT:
            return total > 0 and 100 * failed >= self.failure_threshold * total
        return failed >= self.failure_threshold

    @property
    def threshold_display(self) -> str:
        if self.failure_threshold_unit == self.ThresholdUnit.PERCENT:
            return f"{self.failure_threshold} % of its nodes failed"
        return f"{self.failure_threshold} failed node{'s' if self.failure_threshold != 1 else ''}"


class UpdateRunQuerySet(models.QuerySet["UpdateRun"]):
    def running(self) -> UpdateRunQuerySet:
        return self.filter(state=UpdateRun.State.RUNNING)

    def unstarted(self) -> UpdateRunQuerySet:
        """Runs that have not reached the point where they disrupt their node: a
        scheduled run before its update phase, a cluster node before it took its first
        gate (a place out of the load balancer, else an update slot). Combine with
        running(). An Auto-Update of a single system starts at once."""
        gates = UpdateStep.objects.filter(run=OuterRef("pk"), name__in=UpdateStep.GATES)
        before_phase = Q(trigger=UpdateRun.Trigger.SCHEDULED, update_phase_started=False)
        return self.filter(before_phase | (Exists(gates) & ~Exists(gates.filter(state=UpdateStep.State.SUCCEEDED))))

    def held_by_pause(self) -> UpdateRunQuerySet:
        """Running runs of a paused rollout that wait for its resume (in line at their
        first gate, or before their update phase): nobody wakes them but the resume."""
        return self.running().unstarted().filter(rollout__state=Rollout.State.PAUSED)

    def with_current_step(self) -> UpdateRunQuerySet:
        """Each run with its current step (see UpdateRun.current_step) in the same query:
        a list of runs costs no query per run."""
        current = UpdateStep.objects.filter(run=OuterRef("pk")).current().values("name")[:1]
        # The annotation fills the cached_property UpdateRun.current_step.
        return self.annotate(current_step=Coalesce(Subquery(current), Value("")))  # type: ignore[no-redef]


class UpdateRun(models.Model):
    class Trigger(models.TextChoices):
        MANUAL = "manual", "Auto-Update (manual)"
        SCHEDULED = "scheduled", "Scheduled"
        CATCHUP_FULL = "catchup_full", "Full update from Oldstable"
        CATCHUP_PARTIAL = "catchup_partial", "Partial update from Oldstable"
        # A scheduled download ahead of its update (or of a download-only schedule):
        # the download step only, no maintenance mode, no notice.
        DOWNLOAD = "download", "Download only"

    class State(models.TextChoices):
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        # Called off before anything disruptive (an operator took the node out of one
        # occurrence of a plan): no lock, maintenance mode ends.
        CANCELLED = "cancelled", "Cancelled"

    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="runs")
    release = models.ForeignKey(Release, on_delete=models.PROTECT, related_name="runs")
    packages = models.JSONField(default=list, blank=True, help_text="Package names for a partial update; empty: all.")
    trigger = models.CharField(max_length=20, choices=Trigger.choices, default=Trigger.MANUAL)
    state = models.CharField(max_length=16, choices=State.choices, default=State.RUNNING)
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    message = models.TextField(blank=True, help_text="The notice logged-in users receive.")
    boot_id_before = models.CharField(max_length=64, blank=True)
    version_before = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_activity_at = models.DateTimeField(auto_now_add=True)
    error = models.TextField(blank=True)
    # Scheduled runs: the update time they belong to ("slot"), never started twice.
    schedule = models.ForeignKey(
        "UpdateSchedule", null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    scheduled_for = models.DateTimeField(null=True, blank=True)
    download_rounds = models.PositiveSmallIntegerField(default=0, help_text="Failed rounds of 10 download attempts.")
    slot_token = models.PositiveBigIntegerField(null=True, blank=True, help_text="Fencing token of the cluster slot.")
    # Claimed (conditional UPDATE) by whoever carries a scheduled run into its update
    # phase: the update entry, a late download success or the second download round.
    update_phase_started = models.BooleanField(default=False)
    # The rollout it belongs to (a start of several nodes, a cluster schedule's occurrence); none for a single start.
    rollout = models.ForeignKey(Rollout, null=True, blank=True, on_delete=models.PROTECT, related_name="runs")

    # States change in updates/runs/lifecycle.py only: conditional UPDATEs from the states each transition allows.
    objects = UpdateRunQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        # created_at: the run list's order (see updates/admin.py: UpdateRunAdmin).
        indexes = [models.Index(fields=["state", "last_activity_at"]), models.Index(fields=["created_at"])]
        constraints = [
            models.UniqueConstraint(fields=["node"], condition=Q(state="running"), name="one_running_run_per_node"),
            models.UniqueConstraint(
                fields=["node", "scheduled_for"],
                condition=Q(scheduled_for__isnull=False),
                name="one_run_per_node_and_slot",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.node} -> {self.release.version} ({self.state})"

    def get_absolute_url(self) -> str:
        return reverse("admin:updates_updaterun_change", args=[self.pk])

    # Derived from the steps, never stored: a second copy of where a run stands would
    # drift from the steps. UpdateRun.objects.with_current_step() annotates it for a
    # list of runs (the annotation takes the place of this property).
    @cached_property
    def current_step(self) -> str:
        """The running step, else the first unfinished one (a failed run's: the step it
        failed in); "" once every step is done."""
        return UpdateStep.objects.filter(run=self).current().values_list("name", flat=True).first() or ""


class UpdateStepQuerySet(models.QuerySet["UpdateStep"]):
    def running(self) -> UpdateStepQuerySet:
        return self.filter(state=UpdateStep.State.RUNNING)

    def unfinished(self) -> UpdateStepQuerySet:
        return self.exclude(state__in=UpdateStep.FINISHED)

    def current(self) -> UpdateStepQuerySet:
        """Unfinished steps, the running one first, then in their order."""
        running_first = Case(When(state=UpdateStep.State.RUNNING, then=Value(0)), default=Value(1))
        return self.unfinished().order_by(running_first, "position")

    def waiting(self, name: str) -> UpdateStepQuerySet:
        """The running `name` steps of running runs: a running slot step is a node waiting
        in line for a slot, a running verify step one waiting for its node to come back."""
        return self.filter(name=name, state=UpdateStep.State.RUNNING, run__state=UpdateRun.State.RUNNING)

    def in_line(self) -> UpdateStepQuerySet:
        """Nodes waiting in line for an update slot or a place out of the load balancer."""
        names = (UpdateStep.Name.LEAVE, UpdateStep.Name.SLOT)
        return self.filter(name__in=names, state=UpdateStep.State.RUNNING, run__state=UpdateRun.State.RUNNING)


class UpdateStep(models.Model):
    class Name(models.TextChoices):
        NOTIFY = "notify", "Notify users"
        LEAVE = "leave", "Wait for a place out of the load balancer"
        EXCLUDE = "exclude", "Out of the load balancer"
        HOLD = "hold", "Load-balancer lead time"
        SLOT = "slot", "Wait for an update slot"
        DRAIN = "drain", "Drain (logon off, users logged off)"
        DOWNLOAD = "download", "Download"
        INSTALL = "install", "Install"
        REBOOT = "reboot", "Reboot"
        VERIFY = "verify", "Wait for the node"
        RESUME = "resume", "Back in service"

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        SKIPPED = "skipped", "Skipped"
        FAILED = "failed", "Failed"

    FINISHED = (State.SUCCEEDED, State.SKIPPED)  # done, and the run goes on
    # Where a cluster node starts disrupting (the first of them in its run): a rollout's pause holds it there.
    GATES = (Name.LEAVE, Name.SLOT)

    run = models.ForeignKey(UpdateRun, on_delete=models.CASCADE, related_name="steps")
    name = models.CharField(max_length=16, choices=Name.choices)
    position = models.PositiveSmallIntegerField()
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    bytes_done = models.PositiveBigIntegerField(default=0)
    bytes_total = models.PositiveBigIntegerField(default=0)
    detail = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = UpdateStepQuerySet.as_manager()

    class Meta:
        ordering = ["run", "position"]
        # finished_at: /metrics reads the steps of the last 24 hours at every scrape (updates/metrics.py).
        indexes = [models.Index(fields=["finished_at"], name="updatestep_finished_at")]
        constraints = [models.UniqueConstraint(fields=["run", "name"], name="one_step_name_per_run")]

    def __str__(self) -> str:
        return f"{self.get_name_display()}: {self.state}"

    @property
    def percent(self) -> int:
        if not self.bytes_total:
            return 100 if self.state == self.State.SUCCEEDED else 0
        return min(100, int(100 * self.bytes_done / self.bytes_total))


class UpdateLockQuerySet(models.QuerySet["UpdateLock"]):
    def active(self) -> UpdateLockQuerySet:
        return self.filter(removed_at__isnull=True)


class UpdateLock(models.Model):
    """Set when an update fails; blocks every further update of the node until removed.

    Removed locks stay as history (who removed them, when, why).
    """

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="locks")
    reason = models.TextField()
    run = models.ForeignKey(UpdateRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="locks")
    created_at = models.DateTimeField(auto_now_add=True)
    removed_at = models.DateTimeField(null=True, blank=True)
    removed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = UpdateLockQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["node"], condition=Q(removed_at__isnull=True), name="one_active_lock_per_node"
            )
        ]

    def __str__(self) -> str:
        return f"lock on {self.node}" + (" (removed)" if self.removed_at else "")


class MaintenanceNoticeQuerySet(models.QuerySet["MaintenanceNotice"]):
    def pending(self) -> MaintenanceNoticeQuerySet:
        """Announced updates that have not started yet (nor been refused or cancelled)."""
        return self.filter(state=MaintenanceNotice.State.PENDING)

    def due(self, now: datetime) -> MaintenanceNoticeQuerySet:
        return self.pending().filter(starts_at__lte=now)


class MaintenanceNotice(models.Model):
    """A notice of upcoming maintenance, delivered to the users logged in on a node or cluster.

    An announced update ("announce now, update at") is a notice with a release: its
    update starts at `starts_at` (updates.announced.start_due, claimed by a conditional
    UPDATE of `state`), started by the operator who announced it."""

    class State(models.TextChoices):
        NOTICE = "notice", "Notice only"
        PENDING = "pending", "Update announced"
        STARTED = "started", "Update started"
        REFUSED = "refused", "Refused at its time"
        CANCELLED = "cancelled", "Cancelled"

    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.CASCADE, related_name="notices")
    cluster = models.ForeignKey(Cluster, null=True, blank=True, on_delete=models.CASCADE, related_name="notices")
    message = models.TextField()
    starts_at = models.DateTimeField(help_text="When the maintenance work begins.")
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    delivered_to = models.PositiveIntegerField(default=0, validators=[MinValueValidator(0)], editable=False)
    # An announced update: the release it starts at starts_at, and what became of it.
    release = models.ForeignKey(
        Release, null=True, blank=True, on_delete=models.PROTECT, related_name="+",
        help_text="The update this notice announces; it starts at the notice's time.",
    )  # fmt: skip
    state = models.CharField(max_length=16, choices=State.choices, default=State.NOTICE)
    run = models.ForeignKey(UpdateRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    outcome = models.TextField(blank=True, help_text="Why the update did not start, or who cancelled it.")
    decided_at = models.DateTimeField(null=True, blank=True, help_text="When it started, was refused or cancelled.")

    objects = MaintenanceNoticeQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state", "starts_at"])]  # the due announcements, every few seconds
        constraints = [
            models.CheckConstraint(
                condition=(Q(node__isnull=False) & Q(cluster__isnull=True))
                | (Q(node__isnull=True) & Q(cluster__isnull=False)),
                name="notice_for_node_or_cluster",
            ),
            models.CheckConstraint(
                condition=Q(state="notice") | (Q(release__isnull=False) & Q(node__isnull=False)),
                name="announced_update_of_a_node",
            ),
        ]

    def __str__(self) -> str:
        return f"notice for {self.node or self.cluster} at {self.starts_at:%Y-%m-%d %H:%M}"

    def clean(self) -> None:
        if bool(self.node_id) == bool(self.cluster_id):
            raise ValidationError("Choose either a node or a cluster.")


class UpdateSchedule(models.Model):
    """Time-controlled download and update of a single system or a whole cluster.

    Owns two django-celery-beat entries (download and update), each armed for its
    next firing (updates/schedules.py); saving arms them again. Either a recurring
    window (cron) or a one-off date.
    """

    name = models.CharField(max_length=100)
    node = models.ForeignKey(
        Node, null=True, blank=True, on_delete=models.CASCADE, related_name="schedules",
        limit_choices_to={"cluster__isnull": True},
        help_text="A single system; for cluster nodes schedule the cluster.",
    )  # fmt: skip
    cluster = models.ForeignKey(Cluster, null=True, blank=True, on_delete=models.CASCADE, related_name="schedules")
    cron = models.CharField(
        "recurring window", max_length=100, blank=True,
        help_text='Cron expression "minute hour day-of-month month day-of-week", e.g. "0 3 * * 0" for Sundays 03:00.',
    )  # fmt: skip
    run_at = models.DateTimeField("one-off date", null=True, blank=True, help_text="Instead of a recurring window.")
    timezone = models.CharField(max_length=64, default=settings.TIME_ZONE)
    download_lead = models.DurationField(
        default=timedelta(hours=1),
        help_text="The download starts this long before the update (the manual: 1 hour). "
        "Longer moves it to a time of low network load.",
    )
    download_cron = models.CharField(
        "download window", max_length=100, blank=True,
        help_text="Optional: a cron expression of its own for the download, instead of the lead.",
    )  # fmt: skip
    download_only = models.BooleanField(
        default=False,
        help_text="Only download the newest release at the window's times (no update, no maintenance mode, no "
        "notice): the next update or Auto-Update uses the verified files on the node.",
    )
    time_control = models.BooleanField(default=True, help_text="Off: nothing fires until it is switched on again.")
    disabled_reason = models.TextField(blank=True, editable=False)
    download_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        editable=False,
    )  # fmt: skip
    update_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        editable=False,
    )  # fmt: skip
    # The instant each entry last fired for. The first firing of an instant fires every
    # schedule due then (updates/scheduled.py: claim); this mark tells the others' own
    # tasks, arriving later, that theirs has fired.
    download_fired_for = models.DateTimeField(null=True, blank=True, editable=False)
    update_fired_for = models.DateTimeField(null=True, blank=True, editable=False)
    last_checked_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_result = models.TextField(blank=True, editable=False)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(node__isnull=False, cluster__isnull=True) | Q(node__isnull=True, cluster__isnull=False),
                name="schedule_for_node_or_cluster",
            ),
            models.CheckConstraint(
                condition=(~Q(cron="") & Q(run_at__isnull=True)) | (Q(cron="") & Q(run_at__isnull=False)),
                name="schedule_cron_or_date",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        from updates.schedules import sync_beat

        with transaction.atomic():
            super().save(*args, **kwargs)
            sync_beat(self)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        from updates.schedules import delete_beat_entries

        with transaction.atomic():
            delete_beat_entries(self)
            return super().delete(*args, **kwargs)

    def clean(self) -> None:
        from updates.schedule_rules import validate_schedule

        validate_schedule(self)

    def target_nodes(self) -> models.QuerySet[Node]:
        if self.node_id:
            return Node.objects.filter(pk=self.node_id)
        return Node.objects.filter(cluster=self.cluster)


class LeftSchedule(models.Model):
    """A cluster node that left its schedule: its download failed twice (the manual:
    time control off, an update lock). The rest of the cluster goes on; the node comes
    back when an operator (group `update`) puts it back, after removing its lock."""

    schedule = models.ForeignKey(UpdateSchedule, on_delete=models.CASCADE, related_name="left")
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="+")
    reason = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["node__hostname"]
        constraints = [models.UniqueConstraint(fields=["schedule", "node"], name="a_node_leaves_a_schedule_once")]

    def __str__(self) -> str:
        return f"{self.node} left {self.schedule}"


class UpdatePlan(models.Model):
    """The rolling plan of one occurrence of a cluster schedule: each node's own update
    time (PlanEntry), within the cluster's two bounds as they were when it was made.
    Made when the occurrence's first entry fires, or earlier when an operator changes
    it; until then the schedule's page shows a preview computed on the fly
    (updates/plans.py)."""

    schedule = models.ForeignKey(UpdateSchedule, on_delete=models.CASCADE, related_name="plans")
    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="plans")
    occurrence = models.DateTimeField(help_text="The schedule's update time: the first wave is logged off then.")
    lead = models.DurationField(help_text="The cluster's load-balancer lead time.")
    cap = models.PositiveSmallIntegerField(help_text="Nodes updating at once, at most.")
    out_bound = models.PositiveSmallIntegerField(help_text="Nodes out of the load balancer at once, at most.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-occurrence"]
        constraints = [
            models.UniqueConstraint(fields=["schedule", "occurrence"], name="one_plan_per_occurrence"),
        ]

    def __str__(self) -> str:
        return f"plan of {self.schedule} for {timezone.localtime(self.occurrence):%Y-%m-%d %H:%M}"


class PlanEntry(models.Model):
    """One node in a plan: when its users are logged off (`planned_at`), and so when
    it leaves the load balancer (the plan's lead before) and is expected back."""

    plan = models.ForeignKey(UpdatePlan, on_delete=models.CASCADE, related_name="entries")
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="plan_entries")
    planned_at = models.DateTimeField(help_text="Its users are logged off at this time.")
    expected = models.DurationField(help_text="From logging its users off to back in service.")
    excluded = models.BooleanField(default=False, help_text="Left out of this occurrence by an operator.")
    note = models.CharField(max_length=300, blank=True, help_text="Why it moved, or why it is left out.")
    changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["planned_at", "node__hostname"]
        constraints = [models.UniqueConstraint(fields=["plan", "node"], name="a_node_once_per_plan")]

    def __str__(self) -> str:
        return f"{self.node} at {timezone.localtime(self.planned_at):%H:%M}"

    @property
    def out_at(self) -> datetime:
        return self.planned_at - self.plan.lead

    @property
    def back_at(self) -> datetime:
        return self.planned_at + self.expected
