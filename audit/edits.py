"""Model edits in the admin (clusters, schedules, contacts): one audit row per add,
change or delete, with what changed, many-to-many fields included.

Recorded here, where operators make them, rather than by auditlog.register's signals:
those write one row per save and another per many-to-many add or remove (a contact's
nodes and clusters: up to five rows for one edit), and a row for every save by code,
which is not an operator's action."""

from __future__ import annotations

from typing import Any, ClassVar

from django import forms
from django.contrib import admin
from django.db import models, transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from audit import records
from audit.records import Operation

# Never into the trail, whatever a future form holds.
SECRET_WORDS = ("password", "secret", "token", "private", "key")


def shown(value: Any) -> str:
    """A value as the row keeps it: related objects by their names."""
    if value is None:
        return ""
    if isinstance(value, QuerySet | list | tuple | set):
        return ", ".join(sorted(str(item) for item in value))
    return str(value)


def form_changes(form: forms.ModelForm, added: bool) -> dict[str, list[str]]:
    """{field: [before, after]} of what the form changed; for a new object, every value given."""
    names = [name for name in form.cleaned_data if shown(form.cleaned_data[name])] if added else form.changed_data
    changes = {}
    for name in names:
        if any(word in name.lower() for word in SECRET_WORDS):
            continue
        before = "" if added else _initial(form, name)
        changes[name] = [before, shown(form.cleaned_data.get(name))]
    return changes


def _initial(form: forms.ModelForm, name: str) -> str:
    value = form.initial.get(name)
    field = form.fields[name]
    if isinstance(field, forms.ModelMultipleChoiceField) or not isinstance(field, forms.ModelChoiceField):
        return shown(value)  # many-to-many: the initial is the list of objects
    if field.queryset is not None and value is not None:
        value = field.queryset.filter(pk=value).first()  # a foreign key's: its id
    return shown(value)


class AuditedAdmin(admin.ModelAdmin):
    """A ModelAdmin whose adds, changes and deletes are recorded as `audit_operations`."""

    audit_operations: ClassVar[tuple[Operation, Operation, Operation]]  # add, change, delete

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)  # after it: the many-to-many fields are saved
        changes = form_changes(form, added=not change)
        if changes or not change:  # saved without a change: nothing happened
            add, edit, _ = self.audit_operations
            records.record(edit if change else add, form.instance, user=request.user, changes=changes)

    def delete_model(self, request: HttpRequest, obj: models.Model) -> None:
        with transaction.atomic():  # recorded first, while the object still has its id and relations
            records.record(self.audit_operations[2], obj, user=request.user)
            super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        with transaction.atomic():
            records.record_each(self.audit_operations[2], [(obj, {}) for obj in queryset], user=request.user)
            super().delete_queryset(request, queryset)
