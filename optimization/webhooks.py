"""The wire format of alert webhooks: a JSON POST signed with HMAC-SHA256, sent with the standard library.

A receiver checks ``X-Axiom-Signature: sha256=<hex>`` against ``HMAC-SHA256(secret, f"{timestamp}.{body}")``
with ``timestamp`` taken from ``X-Axiom-Timestamp`` (unix seconds), and should refuse old timestamps so that
a captured request cannot be replayed. What to do with the answer (retry, give up) is the delivery
service's business, not this module's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from django.core.serializers.json import DjangoJSONEncoder

TIMEOUT_SECONDS = 5
SIGNATURE_HEADER = "X-Axiom-Signature"
TIMESTAMP_HEADER = "X-Axiom-Timestamp"
USER_AGENT = "AxiomEnergyGrid-Webhook/1"


@dataclass(frozen=True)
class WebhookResult:
    ok: bool
    status_code: int | None
    error: str = ""


def webhook_body(payload: dict) -> bytes:
    return json.dumps(payload, cls=DjangoJSONEncoder, separators=(",", ":"), sort_keys=True).encode()


def webhook_signature(*, secret: str, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex>`` of ``f"{timestamp}.{body}"``: the timestamp is signed too, so it cannot be swapped."""
    message = f"{timestamp}.".encode() + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def webhook_signature_verify(*, secret: str, timestamp: int | str, body: bytes, signature: str) -> bool:
    expected = webhook_signature(secret=secret, timestamp=timestamp, body=body)
    return hmac.compare_digest(expected, signature or "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failed delivery: following it would turn the POST into a GET (or send the signed
    body somewhere the operator never configured)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def webhook_post(*, url: str, secret: str, payload: dict, timeout: float = TIMEOUT_SECONDS) -> WebhookResult:
    """POST ``payload`` signed with ``secret``; a 2xx answer is a delivery, anything else an error."""
    if urllib.parse.urlsplit(url).scheme not in {"http", "https"}:
        return WebhookResult(ok=False, status_code=None, error="only http and https URLs are delivered")
    body = webhook_body(payload)
    # Wall-clock time, not the caller's "now": the receiver compares it with its own clock.
    timestamp = int(time.time())
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: webhook_signature(secret=secret, timestamp=timestamp, body=body),
        },
    )
    try:
        with _opener.open(request, timeout=timeout) as response:
            status = response.status
            response.read(1024)  # drain a little so keep-alive servers are not cut off mid-answer
    except urllib.error.HTTPError as exc:
        exc.close()
        return WebhookResult(ok=False, status_code=exc.code, error=f"HTTP {exc.code} {exc.reason}"[:500])
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return WebhookResult(ok=False, status_code=None, error=f"{type(exc).__name__}: {reason}"[:500])
    if 200 <= status < 300:
        return WebhookResult(ok=True, status_code=status)
    return WebhookResult(ok=False, status_code=status, error=f"HTTP {status}")
