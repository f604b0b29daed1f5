"""The one hotfix task: deliver a notification. Retries only temporary errors."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from django.conf import settings

from hotfixes import services
from hotfixes.errors import TemporaryDeliveryError

# Read once at worker start (TGP_HOTFIX_RETRY_BACKOFF, TGP_HOTFIX_DELIVERY_MAX_RETRIES).
RETRY_BACKOFF = max(1, int(getattr(settings, "HOTFIX_RETRY_BACKOFF", 2)))
MAX_RETRIES = int(getattr(settings, "HOTFIX_DELIVERY_MAX_RETRIES", 5))


class DeliveryTask(Task):
    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # Normally deliver() has recorded the outcome already; this catches what it could not.
        if args:
            services.fail_if_stuck(int(args[0]), f"{type(exc).__name__}: {exc}")


@shared_task(
    bind=True,
    base=DeliveryTask,
    name="hotfix.deliver",
    ignore_result=True,
    autoretry_for=(TemporaryDeliveryError,),
    retry_backoff=RETRY_BACKOFF,
    retry_backoff_max=60,
    retry_jitter=False,
    max_retries=MAX_RETRIES,
)
def deliver(self: Task, delivery_id: int) -> str:
    # On the last attempt a temporary error ends the delivery as failed instead of pending.
    final = self.max_retries is not None and self.request.retries >= self.max_retries
    return services.deliver(delivery_id, final=final)
