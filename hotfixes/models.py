"""Hotfix notices: who must hear about an unscheduled update, and how each
notification went. A Delivery row per (notice, contact, channel) is the record
that makes sending twice never notify anybody twice."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models

from nodes.models import Cluster, Node
from updates.models import Release

phone_validator = RegexValidator(
    r"^\+[1-9]\d{6,14}$", "Use the international E.164 form: '+' and 7 to 15 digits, e.g. +4930123456."
)


class Contact(models.Model):
    name = models.CharField(max_length=100)
    email = models.EmailField(blank=True)
    phone = models.CharField(
        max_length=16, blank=True, validators=[phone_validator], help_text="E.164, e.g. +4930123456."
    )
    nodes = models.ManyToManyField(Node, blank=True, related_name="hotfix_contacts")
    clusters = models.ManyToManyField(Cluster, blank=True, related_name="hotfix_contacts")
    wants_calls = models.BooleanField(
        "phone call for urgent notices", default=False, help_text="Urgent notices also call this number."
    )
    active = models.BooleanField(
        default=True,
        help_text="Inactive contacts receive nothing. Deactivate rather than delete: deliveries keep their history.",
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if not self.email and not self.phone:
            raise ValidationError("Give an e-mail address, a phone number, or both.")
        if self.wants_calls and not self.phone:
            raise ValidationError({"wants_calls": "Calls need a phone number."})


class HotfixNotice(models.Model):
    class Urgency(models.TextChoices):
        NORMAL = "normal", "Normal (e-mail)"
        URGENT = "urgent", "Urgent (e-mail, SMS and calls)"

    release = models.ForeignKey(
        Release, on_delete=models.PROTECT, related_name="hotfix_notices", limit_choices_to={"hotfix": True}
    )
    title = models.CharField(max_length=150)
    text = models.TextField(help_text="What the hotfix fixes and what the customer should do.")
    urgency = models.CharField(max_length=8, choices=Urgency.choices, default=Urgency.NORMAL)
    nodes = models.ManyToManyField(Node, blank=True, related_name="hotfix_notices", verbose_name="affected nodes")
    clusters = models.ManyToManyField(
        Cluster, blank=True, related_name="hotfix_notices", verbose_name="affected clusters"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )
    sent_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When the notification was first sent."
    )

    class Meta:
        ordering = ["-created_at"]
        permissions = [("send_hotfixnotice", "Can send hotfix notifications")]

    def __str__(self) -> str:
        return f"{self.title} ({self.release.version})"

    @property
    def is_urgent(self) -> bool:
        return self.urgency == self.Urgency.URGENT

    def clean(self) -> None:
        if self.release_id and not self.release.hotfix:
            raise ValidationError(
                {"release": f"Release {self.release.version} is not a hotfix; notices are for hotfix releases only."}
            )


class Delivery(models.Model):
    class Channel(models.TextChoices):
        EMAIL = "email", "E-mail"
        SMS = "sms", "SMS"
        CALL = "call", "Phone call"

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed"

    # PROTECT: the record of who was told what must outlive an edit; deactivate contacts instead.
    notice = models.ForeignKey(HotfixNotice, on_delete=models.PROTECT, related_name="deliveries")
    contact = models.ForeignKey(Contact, on_delete=models.PROTECT, related_name="deliveries")
    channel = models.CharField(max_length=8, choices=Channel.choices)
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    address = models.CharField(max_length=254, blank=True, help_text="Where the last attempt went.")
    provider_ref = models.CharField("provider reference", max_length=200, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["notice", "contact", "channel"]
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(fields=["notice", "contact", "channel"], name="one_delivery_per_contact_channel")
        ]

    def __str__(self) -> str:
        return f"{self.get_channel_display()} to {self.contact}: {self.state}"
