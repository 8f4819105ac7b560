"""A hop's claim: made by one host, checked by another; every way to forge, stretch,
replay or redirect one is refused."""

from __future__ import annotations

import base64

import orjson
import pytest

from ssw.gateway import hops

SECRET = b"s3cret-of-the-fleet"
NOW = 1_800_000_000.0


def claim(**overrides: object) -> bytes:
    fields: dict[str, object] = {
        "iss": "hosta",
        "aud": "hostb",
        "key": "alice",
        "priority": "interactive",
        "wait": True,
        "fallback": None,
        "method": "POST",
        "path": "/v1/chat/completions",
        "body": b'{"model": "m"}',
        "now": NOW,
    }
    fields.update(overrides)
    secret = fields.pop("secret", SECRET)
    return hops.make(secret, **fields).encode()  # type: ignore[arg-type]


def check(header: bytes, now: float = NOW, path: str = "/v1/chat/completions") -> hops.Claim:
    return hops.Verifier("hostb").check(SECRET, header, "POST", path, now)


def test_a_claim_checks_out_and_carries_the_request_not_the_secret() -> None:
    header = claim()
    got = check(header)
    assert (got.iss, got.key, got.priority, got.wait, got.fallback) == ("hosta", "alice", "interactive", True, None)
    hops.check_body(got, b'{"model": "m"}')
    assert SECRET not in header and b"alice" not in header  # base64 of JSON: the name is not in clear either


def tamper(header: bytes, **changes: object) -> bytes:
    payload, _, signature = header.decode().partition(".")
    fields = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields.update(changes)
    return (base64.urlsafe_b64encode(orjson.dumps(fields)).rstrip(b"=").decode() + "." + signature).encode()


@pytest.mark.parametrize(
    ("header", "now", "path", "why"),
    [
        (claim(secret=b"another fleet"), NOW, "/v1/chat/completions", "not signed"),
        (tamper(claim(), key="root"), NOW, "/v1/chat/completions", "not signed"),
        (tamper(claim(), exp=NOW + 10**6), NOW, "/v1/chat/completions", "not signed"),
        (claim(), NOW + hops.LIFETIME_S + hops.SKEW_S + 1, "/v1/chat/completions", "expired"),
        (claim(now=NOW + 3600), NOW, "/v1/chat/completions", "longer than"),
        (claim(aud="hostc"), NOW, "/v1/chat/completions", "for host 'hostc'"),
        (claim(), NOW, "/v1/completions", "another request"),
        (b"garbage", NOW, "/v1/chat/completions", "not signed"),
        (b"x" * 5000, NOW, "/v1/chat/completions", "too long"),
    ],
)
def test_forged_stretched_expired_or_misdirected_claims_are_refused(
    header: bytes, now: float, path: str, why: str
) -> None:
    with pytest.raises(hops.BadClaim, match=why):
        check(header, now, path)


def test_a_claim_is_good_once() -> None:
    verifier = hops.Verifier("hostb")
    header = claim()
    verifier.check(SECRET, header, "POST", "/v1/chat/completions", NOW)
    with pytest.raises(hops.BadClaim, match="used already"):
        verifier.check(SECRET, header, "POST", "/v1/chat/completions", NOW + 1)
    # Nonces are forgotten once their claims expire: memory stays bounded.
    verifier.check(SECRET, claim(now=NOW + 100), "POST", "/v1/chat/completions", NOW + 100)
    assert len(verifier._seen) == 1


def test_a_body_other_than_the_claimed_one_is_refused() -> None:
    got = check(claim())
    with pytest.raises(hops.BadClaim, match="not the one"):
        hops.check_body(got, b'{"model": "other"}')
