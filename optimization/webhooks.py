"""The wire format of alert webhooks: Standard Webhooks (standardwebhooks.com) over HTTP/1.1 connections
kept open for a delivery run, with the standard library.

Every request is a JSON POST with the headers of the specification:

- ``webhook-id``: the message's id, the same on every retry of that message. Delivery is at least once (a
  worker that dies after sending but before recording sends again), so a receiver drops a repeat by this id.
- ``webhook-timestamp``: unix seconds of this attempt; a receiver refuses one too far from its clock.
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``, made by the
  ``standardwebhooks`` library (the specification's reference implementation).

And, for receivers written before those headers, ``X-Axiom-Timestamp`` and ``X-Axiom-Signature:
sha256=<hex HMAC-SHA256(key, "{timestamp}.{body}")>``, with the same key. That is the specification's own
migration advice: add its headers beside the existing ones, and keep the existing secrets.

The key is the endpoint's secret as the specification serializes it: ``whsec_`` and the base64 of random
bytes. A secret without that prefix (stored before, or written around the form) is its own key, its UTF-8
bytes; migration 0007 re-encoded every stored secret that way, so each endpoint kept its key.

What to do with an answer (retry, give up) is the delivery service's business, not this module's.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import http.client
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from standardwebhooks import Webhook

TIMEOUT_SECONDS = 5
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the specification asks for 24 to 64 random bytes
SECRET_MAX_BYTES = 64
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
LEGACY_SIGNATURE_HEADER = "X-Axiom-Signature"
LEGACY_TIMESTAMP_HEADER = "X-Axiom-Timestamp"
USER_AGENT = "AxiomEnergyGrid-Webhook/2"
# What is read of an answer: enough to finish a short body so that the connection can carry the next request;
# a longer answer closes the connection instead of being read to its end.
RESPONSE_READ_BYTES = 64 * 1024
# A kept-alive connection that the server closed while it was idle fails at once with one of these: the
# request never reached the application, so it is sent again on a new connection (once).
_STALE_CONNECTION_ERRORS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


@dataclass(frozen=True)
class WebhookResult:
    ok: bool
    status_code: int | None
    error: str = ""


# --- Secrets and signatures -----------------------------------------------------------------------------


def webhook_secret_generate() -> str:
    """A new endpoint's secret: 32 random bytes, serialized as the specification says."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def webhook_secret_validate(secret: str) -> None:
    """What a secret typed into a form must be: ``whsec_`` and the base64 of 24 to 64 bytes."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValidationError(f"A secret starts with {SECRET_PREFIX} (leave the generated one to be safe).")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"After {SECRET_PREFIX}, a secret is base64.") from None
    if not 24 <= len(key) <= SECRET_MAX_BYTES:
        raise ValidationError(f"A secret holds 24 to {SECRET_MAX_BYTES} bytes; this one holds {len(key)}.")


def webhook_secret_key(secret: str) -> bytes:
    """The HMAC key of a stored secret: the bytes a ``whsec_`` secret encodes, or a legacy secret's own."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            pass  # not base64 after all: a legacy secret that happens to start like one
    return secret.encode()


def webhook_body(payload: dict | list) -> bytes:
    """Compact JSON: the signature covers these exact bytes, so a receiver verifies the raw body."""
    return json.dumps(payload, cls=DjangoJSONEncoder, separators=(",", ":"), sort_keys=True).encode()


def webhook_headers(*, key: bytes, message_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The signature headers of one attempt: Standard Webhooks', and the legacy pair with the same key."""
    signed_at = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
    legacy = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {
        ID_HEADER: message_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: Webhook(key).sign(msg_id=message_id, timestamp=signed_at, data=body.decode()),
        LEGACY_TIMESTAMP_HEADER: str(timestamp),
        LEGACY_SIGNATURE_HEADER: f"sha256={legacy}",
    }


# --- Sending --------------------------------------------------------------------------------------------


class WebhookClient:
    """POSTs signed bodies, keeping connections open per origin between requests (a TLS handshake per
    alert would cost more than the alert). Thread-safe: a connection is used by one request at a time.
    Redirects are not followed: a 3xx is a failed delivery (following it would send the signed body somewhere
    the operator never configured). Close it, or use it as a context manager, to close what stays open."""

    def __init__(self, *, timeout: float = TIMEOUT_SECONDS):
        self.timeout = timeout
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._tls = ssl.create_default_context()

    def __enter__(self) -> WebhookClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def post(self, *, url: str, key: bytes, message_id: str, body: bytes) -> WebhookResult:
        """One attempt: a 2xx answer is a delivery, anything else an error."""
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return WebhookResult(ok=False, status_code=None, error="the URL's port is not a number")
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            return WebhookResult(ok=False, status_code=None, error="only http and https URLs are delivered")
        origin = (parts.scheme, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Wall-clock time, not the caller's "now": the receiver compares it with its own clock.
        headers = webhook_headers(key=key, message_id=message_id, body=body, timestamp=int(time.time()))
        headers.update({"Content-Type": "application/json", "User-Agent": USER_AGENT})
        for fresh in (False, True):
            connection, reused = self._acquire(origin, fresh=fresh)
            try:
                connection.request("POST", target, body=body, headers=headers)
                response = connection.getresponse()
                response.read(RESPONSE_READ_BYTES)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                connection.close()
                if reused and isinstance(exc, _STALE_CONNECTION_ERRORS):
                    continue
                return WebhookResult(ok=False, status_code=None, error=f"{type(exc).__name__}: {exc}"[:500])
            self._release(origin, connection, reusable=response.isclosed() and not response.will_close)
            if 200 <= response.status < 300:
                return WebhookResult(ok=True, status_code=response.status)
            error = f"HTTP {response.status} {response.reason}".strip()[:500]
            return WebhookResult(ok=False, status_code=response.status, error=error)
        raise AssertionError("unreachable: the second try uses a new connection")

    def _acquire(
        self, origin: tuple[str, str, int], *, fresh: bool
    ) -> tuple[http.client.HTTPConnection, bool]:
        if not fresh:
            with self._lock:
                idle = self._idle.get(origin)
                if idle:
                    return idle.pop(), True
        scheme, host, port = origin
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._tls), False
        return http.client.HTTPConnection(host, port, timeout=self.timeout), False

    def _release(self, origin, connection: http.client.HTTPConnection, *, reusable: bool) -> None:
        if not reusable:
            connection.close()
            return
        with self._lock:
            self._idle.setdefault(origin, []).append(connection)
