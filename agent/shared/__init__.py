"""What the appliance and the control plane share: names, message types and their
codec, the rules for versions and names, the update repository's format and its
signature checks, typed environment readers and atomic file writes.

The control side (Django) imports this package and nothing else of ``agent``; the
agent imports no Django. Nothing here imports anything outside the standard library,
``httpx`` and ``cryptography``.
"""
