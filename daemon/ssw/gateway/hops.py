"""What one gateway's request to another host's gateway carries: a claim, signed
with the fleet's secret, that the receiving host checks before it reads a byte
of the body.

A hop never carries the secret or a client's key. It carries who asked (the
API key's *name*, which the receiving host looks up in its own key file: the
same on every host), how (priority, whether to wait, whether a fallback may
answer), for what (method, path and the SHA-256 of the body), from and to
which host, until when (``exp``, a few seconds ahead), and a nonce. The claim
is JSON, base64url, then ``.`` and the base64url HMAC-SHA256 of that text
under the fleet secret::

    X-SSW-Fleet-Claim: eyJ2IjoxLCJpc3MiOiJob3N0YSIs....Zm9v

The receiver refuses (401) a claim that is malformed, signed with another
secret, meant for another host, expired or issued too far ahead, seen before
(its nonce, for as long as it would be valid), for another method or path,
or whose body digest does not match; and a key name it does not know.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import secrets
import time
from dataclasses import asdict, dataclass

import orjson

from ssw.errors import SswError

HEADER = b"x-ssw-fleet-claim"
VERSION = 1
LIFETIME_S = 30.0  # a claim is good this long after it is made
SKEW_S = 5.0  # clocks of the fleet may differ this much (NTP keeps them far closer)
MAX_HEADER = 4096


class BadClaim(SswError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_fleet_claim"


@dataclass(frozen=True, slots=True)
class Claim:
    iss: str  # the host that signed it
    aud: str  # the host it is for
    key: str  # the API key's name ("" with auth off)
    priority: str
    wait: bool  # hold the request while the model loads there
    fallback: bool | None  # the client's X-SSW-Fallback (None: not sent)
    method: str
    path: str
    body: str  # hex SHA-256 of the body
    exp: float
    nonce: str
    v: int = VERSION


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def make(
    secret: bytes,
    *,
    iss: str,
    aud: str,
    key: str,
    priority: str,
    wait: bool,
    fallback: bool | None,
    method: str,
    path: str,
    body: bytes,
    now: float | None = None,
) -> str:
    """A signed claim, as the header's value."""
    claim = Claim(
        iss=iss,
        aud=aud,
        key=key,
        priority=priority,
        wait=wait,
        fallback=fallback,
        method=method,
        path=path,
        body=digest(body),
        exp=(now if now is not None else time.time()) + LIFETIME_S,
        nonce=secrets.token_hex(16),
    )
    payload = _b64(orjson.dumps(asdict(claim)))
    return payload + "." + _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())


class Verifier:
    """Checks claims for one host; remembers the nonces it accepted while they are valid,
    so that a claim seen on the wire cannot be sent again (per gateway process)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._seen: set[str] = set()
        self._order: collections.deque[tuple[float, str]] = collections.deque()  # (exp, nonce), as accepted

    def check(self, secret: bytes, header: bytes, method: str, path: str, now: float | None = None) -> Claim:
        """The claim, verified for everything but its body; BadClaim otherwise."""
        now = now if now is not None else time.time()
        if len(header) > MAX_HEADER:
            raise BadClaim("the fleet claim is too long")
        text = header.decode("latin-1")
        payload, _, signature = text.partition(".")
        expected = _b64(hmac.new(secret, payload.encode("latin-1"), hashlib.sha256).digest())
        if not signature or not hmac.compare_digest(signature, expected):
            raise BadClaim("the fleet claim is not signed with this fleet's secret")
        try:
            fields = orjson.loads(_unb64(payload))
            claim = Claim(**fields)
        except (ValueError, TypeError):
            raise BadClaim("the fleet claim does not parse") from None
        if claim.v != VERSION:
            raise BadClaim(f"fleet claim version {claim.v} is not {VERSION}")
        if claim.aud != self.host:
            raise BadClaim(f"the fleet claim is for host {claim.aud[:64]!r}, not this one")
        if not isinstance(claim.exp, int | float) or claim.exp <= now - SKEW_S:
            raise BadClaim("the fleet claim has expired")
        if claim.exp > now + LIFETIME_S + SKEW_S:
            raise BadClaim("the fleet claim is valid for longer than a claim may be")
        if claim.method != method or claim.path != path:
            raise BadClaim("the fleet claim is for another request")
        # Expired claims are refused anyway: their nonces need not be kept. (Accepted in
        # about the order they expire: a claim's lifetime is fixed.)
        while self._order and self._order[0][0] <= now - SKEW_S:
            self._seen.discard(self._order.popleft()[1])
        if claim.nonce in self._seen:
            raise BadClaim("the fleet claim was used already")
        self._seen.add(claim.nonce)
        self._order.append((claim.exp, claim.nonce))
        return claim


def check_body(claim: Claim, body: bytes) -> None:
    if not hmac.compare_digest(digest(body), claim.body):
        raise BadClaim("the body is not the one the fleet claim was made for")
