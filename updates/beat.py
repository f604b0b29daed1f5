"""celery beat's scheduler: django-celery-beat's DatabaseScheduler, except that beat never
writes a whole entry back.

A schedule's one-off entries are replaced (deleted and made anew under the same name)
when they fire and whenever the control plane arms them again (updates/schedules.py:
arm). Beat holds its own copy of each entry and writes it back some time after it sent
it: DatabaseScheduler with ``Model.save()``, which UPDATEs the row and, when the control
worker deleted it meanwhile, INSERTs it again, under the name the new entry now holds:
IntegrityError, and beat stops (bench/beat_lag.py, 500 schedules due at once: beat died
after 20 of them). Here beat's write-backs are UPDATEs of the row it read: one that was
replaced stays replaced, and what the control plane armed is not overwritten.
"""

from __future__ import annotations

import time
from typing import Any

from celery import schedules
from django_celery_beat.schedulers import NEVER_CHECK_TIMEOUT, DatabaseScheduler, ModelEntry


class Entry(ModelEntry):
    def save(self) -> None:
        # The run count and time of the row beat fired, if it still exists (no_changes
        # among save_fields is an attribute of beat's copy, not a column).
        fields = {"last_run_at": self.model.last_run_at, "total_run_count": self.model.total_run_count}
        type(self.model)._default_manager.filter(pk=self.model.pk).update(**fields)

    def _disable(self, model: Any) -> None:
        model.no_changes, model.enabled = True, False
        type(model)._default_manager.filter(pk=model.pk).update(enabled=False)

    def is_due(self) -> Any:
        model = self.model
        if model.one_off and model.enabled and model.total_run_count > 0:
            # As DatabaseScheduler: a one-off entry that ran is disabled; but only the row it ran as.
            model.enabled, model.total_run_count, model.no_changes = False, 0, False
            type(model)._default_manager.filter(pk=model.pk).update(enabled=False, total_run_count=0)
            return schedules.schedstate(False, NEVER_CHECK_TIMEOUT)
        return super().is_due()


class Scheduler(DatabaseScheduler):
    """Reads the schedule again at most every RELOAD_EVERY seconds.

    DatabaseScheduler reloads every entry whenever any changed, and beat sends one due
    entry per tick. When 500 schedules fire at once the control plane arms each one's
    next entry as it fires: 500 reloads of 1,000 entries between the sends, and the
    last send 20 s late (bench/beat_lag.py). Entries that fired are disabled in beat's
    own copy, so sending from a copy up to a second old sends nothing twice; a change
    (a new entry, an operator's edit) is seen within the second.
    """

    Entry = Entry
    RELOAD_EVERY = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._changes_read_at = 0.0
        super().__init__(*args, **kwargs)

    def schedule_changed(self) -> bool:
        now = time.monotonic()
        if now - self._changes_read_at < self.RELOAD_EVERY:
            return False
        self._changes_read_at = now
        return bool(super().schedule_changed())
