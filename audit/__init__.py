"""The audit trail: who did what to which node, cluster or object, when and from which
address. Rows are django-auditlog's LogEntry; this app writes them for the operators'
actions (audit.records) and shows them read-only in the admin (audit.admin)."""
