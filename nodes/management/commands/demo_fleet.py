from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from nodes import demo


class Command(BaseCommand):
    help = "Create (or refresh) the demo fleet, its signed repository and the demo users. Idempotent."

    def handle(self, *args: Any, **options: Any) -> None:
        serial = demo.build_demo_repository()
        nodes = demo.seed_nodes()
        control_pub = demo.publish_control_key()
        users = demo.seed_users()
        self.stdout.write(f"demo repository signed, index serial {serial}")
        self.stdout.write(f"demo fleet: {', '.join(n.hostname for n in nodes)}")
        self.stdout.write(
            "demo nodes enrolled automatically: their keys were made in var/nodes/<name>/ and accepted "
            f"(a real node's key is accepted by an operator); the agents pin the control key in {control_pub}"
        )
        self.stdout.write(
            f"admin users: {', '.join(users['users'])} (groups: operator=update, maintainer=maint); "
            f"password in var/demo-password"
        )
