"""Hotfix e-mails through Django's e-mail framework: one message per contact,
plain text plus HTML. SMTP settings are Django's own (EMAIL_HOST, EMAIL_PORT, ...)."""

from __future__ import annotations

import smtplib
import ssl
from typing import Any

from django.conf import settings
from django.core.mail import EmailMultiAlternatives, get_connection
from django.core.mail.message import make_msgid
from django.template.loader import render_to_string

from hotfixes.errors import PermanentDeliveryError, TemporaryDeliveryError, scrub
from hotfixes.models import Contact, HotfixNotice

DEFAULT_TIMEOUT = 30.0  # Django's default is none: a silent server would hang the worker


def subject(notice: HotfixNotice) -> str:
    prefix = "[URGENT hotfix]" if notice.is_urgent else "[Hotfix]"
    title = " ".join(notice.title.split())  # a header must not contain line breaks
    return f"{prefix} {title} ({notice.release.version})"


def build_message(notice: HotfixNotice, contact: Contact, context: dict[str, Any]) -> EmailMultiAlternatives:
    context = {"notice": notice, "release": notice.release, "contact": contact, **context}
    message = EmailMultiAlternatives(
        subject=subject(notice),
        body=render_to_string("hotfixes/notice_email.txt", context),
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[contact.email],
        # Our own Message-ID, so the delivery can record what the server accepted.
        headers={"Message-ID": make_msgid(domain="tgpadmin.invalid")},
    )
    message.attach_alternative(render_to_string("hotfixes/notice_email.html", context), "text/html")
    return message


def send(message: EmailMultiAlternatives) -> str:
    """Send one message; returns its Message-ID. Raises a Temporary/PermanentDeliveryError."""
    timeout = getattr(settings, "EMAIL_TIMEOUT", None) or DEFAULT_TIMEOUT
    try:
        with get_connection(fail_silently=False, timeout=timeout) as connection:
            message.connection = connection
            message.send()
    except smtplib.SMTPRecipientsRefused as exc:
        # Only a 4xx refusal (greylisting, full mailbox) is worth another try.
        temporary = all(400 <= code < 500 for code, _ in exc.recipients.values())
        error = TemporaryDeliveryError if temporary else PermanentDeliveryError
        raise error(scrub(f"SMTP server refused the recipient: {_recipients(exc)}")) from None
    except smtplib.SMTPResponseException as exc:
        raise _by_code(exc.smtp_code, exc.smtp_error) from None
    except (smtplib.SMTPNotSupportedError, ssl.SSLCertVerificationError) as exc:
        raise PermanentDeliveryError(scrub(f"SMTP configuration problem: {exc}")) from None
    except (smtplib.SMTPException, OSError) as exc:  # disconnects, refused connections, timeouts
        raise TemporaryDeliveryError(scrub(f"SMTP server unreachable: {type(exc).__name__}: {exc}")) from None
    return str(message.extra_headers["Message-ID"])


def _by_code(code: int, error: bytes | str) -> Exception:
    text = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
    message = scrub(f"SMTP server answered {code}: {text}")
    if 500 <= code < 600:
        return PermanentDeliveryError(message)
    return TemporaryDeliveryError(message)  # 4xx, or -1 for a broken greeting


def _recipients(exc: smtplib.SMTPRecipientsRefused) -> str:
    parts = []
    for address, (code, error) in exc.recipients.items():
        text = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
        parts.append(f"{address}: {code} {text}")
    return "; ".join(parts)
