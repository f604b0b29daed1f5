"""SMS and voice calls through a pluggable gateway (setting HOTFIX_PHONE_GATEWAY):
``twilio`` (Twilio's REST API), ``webhook`` (a generic JSON endpoint) or ``none``.

Every send returns the provider's reference. HTTP 5xx, 429 and network errors are
temporary (the task retries), any other refusal is permanent. Credentials come
from settings only and never reach a log line or an error message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol
from xml.sax.saxutils import escape

import httpx
from django.conf import settings

from hotfixes.errors import PermanentDeliveryError, TemporaryDeliveryError, scrub

TWILIO_BASE_URL = "https://api.twilio.com"
SMS_MAX_CHARS = 1600  # Twilio refuses longer bodies
TWIML_MAX_CHARS = 4000


class Gateway(Protocol):
    def send_sms(self, to: str, text: str) -> str: ...

    def call(self, to: str, text: str) -> str: ...


def gateway() -> Gateway:
    """The gateway the settings choose, built per delivery so settings changes apply at once."""
    name = str(getattr(settings, "HOTFIX_PHONE_GATEWAY", "none") or "none").strip().lower()
    timeout = float(getattr(settings, "HOTFIX_HTTP_TIMEOUT", 10.0))
    if name == "twilio":
        return TwilioGateway(
            account_sid=getattr(settings, "HOTFIX_TWILIO_ACCOUNT_SID", ""),
            auth_token=getattr(settings, "HOTFIX_TWILIO_AUTH_TOKEN", ""),
            from_number=getattr(settings, "HOTFIX_TWILIO_FROM", ""),
            base_url=getattr(settings, "HOTFIX_TWILIO_BASE_URL", "") or TWILIO_BASE_URL,
            timeout=timeout,
        )
    if name == "webhook":
        return WebhookGateway(
            url=getattr(settings, "HOTFIX_WEBHOOK_URL", ""),
            token=getattr(settings, "HOTFIX_WEBHOOK_TOKEN", ""),
            timeout=timeout,
        )
    if name == "none":
        return NoGateway()
    raise PermanentDeliveryError(f"Unknown HOTFIX_PHONE_GATEWAY {name!r}: use twilio, webhook or none.")


class NoGateway:
    """Phone channels are planned anyway, so that the operator sees them fail and can resend later."""

    def send_sms(self, to: str, text: str) -> str:
        raise PermanentDeliveryError("No phone gateway is configured (HOTFIX_PHONE_GATEWAY=none).")

    call = send_sms


def _post(provider: str, url: str, timeout: float, **request: Any) -> dict[str, Any]:
    """POST and classify the outcome; returns the JSON body of a 2xx answer ({} if not JSON)."""
    try:
        response = httpx.post(url, timeout=timeout, **request)
    except httpx.TransportError as exc:
        raise TemporaryDeliveryError(scrub(f"{provider} unreachable: {type(exc).__name__}: {exc}")) from None
    if response.is_success:
        # Accepted: never turn this into an error, a retry would notify twice.
        try:
            body = response.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}
    detail = _error_detail(response)
    message = scrub(f"{provider} answered HTTP {response.status_code}: {detail}")
    if response.status_code == 429 or response.status_code >= 500:
        raise TemporaryDeliveryError(message)
    raise PermanentDeliveryError(message)


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)[:300]
    return str(body)[:300]


@dataclass
class TwilioGateway:
    account_sid: str
    auth_token: str
    from_number: str
    base_url: str = TWILIO_BASE_URL
    timeout: float = 10.0

    def _send(self, resource: str, fields: dict[str, str]) -> str:
        if not (self.account_sid and self.auth_token and self.from_number):
            raise PermanentDeliveryError(
                "Twilio is not configured: set TGP_TWILIO_ACCOUNT_SID, TGP_TWILIO_AUTH_TOKEN and TGP_TWILIO_FROM."
            )
        url = f"{self.base_url.rstrip('/')}/2010-04-01/Accounts/{self.account_sid}/{resource}.json"
        body = _post("Twilio", url, self.timeout, data=fields, auth=(self.account_sid, self.auth_token))
        return str(body.get("sid", ""))

    def send_sms(self, to: str, text: str) -> str:
        return self._send("Messages", {"To": to, "From": self.from_number, "Body": text[:SMS_MAX_CHARS]})

    def call(self, to: str, text: str) -> str:
        return self._send("Calls", {"To": to, "From": self.from_number, "Twiml": twiml(text)})


def twiml(text: str) -> str:
    budget = TWIML_MAX_CHARS - len("<Response><Say></Say></Response>")
    said = escape(text)
    while len(said) > budget:  # escaping lengthens the text: cut the text, never an entity
        text = text[: len(text) - (len(said) - budget)]
        said = escape(text)
    return f"<Response><Say>{said}</Say></Response>"


@dataclass
class WebhookGateway:
    url: str
    token: str
    timeout: float = 10.0

    def _send(self, channel: str, to: str, text: str) -> str:
        if not self.url:
            raise PermanentDeliveryError("The phone webhook is not configured: set TGP_HOTFIX_WEBHOOK_URL.")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        body = _post("Phone webhook", self.url, self.timeout, json={"channel": channel, "to": to, "text": text},
                     headers=headers)  # fmt: skip
        return str(body.get("id", "") or "")

    def send_sms(self, to: str, text: str) -> str:
        return self._send("sms", to, text)

    def call(self, to: str, text: str) -> str:
        return self._send("call", to, text)


class _ScrubSecrets(logging.Filter):
    """httpx logs every request URL at INFO; Twilio's contains the account SID."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def install_log_scrubber() -> None:
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _ScrubSecrets) for f in logger.filters):
        logger.addFilter(_ScrubSecrets())
