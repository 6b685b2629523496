"""JWT auth (PyJWT): HS256 with a secret, RS256/ES256 with a public key or a JWKS file.

The attacks first (each failed with the hand-written verifier), then what teams with an
identity provider need: issuer, audience, leeway, a maximum lifetime, key rotation.
"""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SECRET = "s3cret-for-tests-that-is-long-enough"
DEMO = {"prompt": "hi", "model": "demo-fast"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(claims: dict, secret: str = SECRET, **header) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=header or None)


def status(client, token: str) -> int:
    response = client.post("/api/chat", json=DEMO, headers={"Authorization": f"Bearer {token}"})
    if response.status_code != 200:
        assert response.get_json()["error"]["type"] == "unauthorized", response.get_json()
    return response.status_code


def fresh(**extra) -> dict:
    now = int(time.time())
    return {"sub": "ann", "iat": now, "exp": now + 600, **extra}


@pytest.fixture
def hs_client(make_app):
    return make_app(JWT_SECRET=SECRET).test_client()


def test_a_valid_token_is_accepted(hs_client):
    assert status(hs_client, hs256(fresh())) == 200


@pytest.mark.parametrize("exp", ["NaN", "Infinity", "1e400", "-1e400"])
def test_non_finite_expiry_is_refused(hs_client, exp):
    head = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(('{"sub":"ann","exp":' + exp + "}").encode())
    import hashlib
    import hmac

    signature = b64(hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
    assert status(hs_client, f"{head}.{body}.{signature}") == 401


@pytest.mark.parametrize("suffix", ["=", "==", "!!", "%", "\t!"])
def test_loose_base64_is_refused(hs_client, suffix):
    token = hs256(fresh())
    assert status(hs_client, token + suffix) == 401
    head, body, signature = token.split(".")
    assert status(hs_client, f"{head}{suffix}.{body}.{signature}") == 401


@pytest.mark.parametrize("claims", [
    {"exp": int(time.time()) + 600},  # no sub: every such token would share one identity
    {"sub": "", "exp": int(time.time()) + 600},
    {"sub": 5, "exp": int(time.time()) + 600},
    {"sub": "ann"},  # no exp
    {"sub": "ann", "exp": "tomorrow"},
    {"sub": "ann", "exp": int(time.time()) - 3600},
    {"sub": "ann", "exp": int(time.time()) + 600, "nbf": int(time.time()) + 3600},
])
def test_claims_that_are_refused(hs_client, claims):
    assert status(hs_client, hs256(claims)) == 401


def test_the_none_algorithm_and_other_secrets_are_refused(hs_client):
    head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = b64(json.dumps(fresh()).encode())
    assert status(hs_client, f"{head}.{body}.") == 401
    assert status(hs_client, hs256(fresh(), "another-secret-that-is-long-enough")) == 401
    assert status(hs_client, "a.b.c") == 401
    assert status(hs_client, "x" * 20_000) == 401


def test_two_subjects_are_two_identities(make_app):
    client = make_app(JWT_SECRET=SECRET).test_client()
    ann, bob = hs256(fresh()), hs256(fresh(sub="bob"))
    cid = client.post("/api/chat", json=DEMO, headers={"Authorization": f"Bearer {ann}"}).get_json()["conversation_id"]
    assert client.get(f"/api/conversations/{cid}", headers={"Authorization": f"Bearer {bob}"}).status_code == 404
    assert client.get(f"/api/conversations/{cid}", headers={"Authorization": f"Bearer {ann}"}).status_code == 200


def test_issuer_audience_leeway_and_maximum_lifetime(make_app):
    client = make_app(JWT_SECRET=SECRET, JWT_ISSUER="https://id.example", JWT_AUDIENCE="relay",
                      JWT_LEEWAY=5, JWT_MAX_LIFETIME=3600).test_client()
    now = int(time.time())
    good = fresh(iss="https://id.example", aud="relay")
    assert status(client, hs256(good)) == 200
    assert status(client, hs256({**good, "aud": ["other", "relay"]})) == 200
    assert status(client, hs256({**good, "iss": "https://evil.example"})) == 401
    assert status(client, hs256({k: v for k, v in good.items() if k != "iss"})) == 401
    assert status(client, hs256({**good, "aud": "other"})) == 401
    assert status(client, hs256({**good, "exp": now - 2})) == 200  # within the 5 s leeway
    assert status(client, hs256({**good, "exp": now - 30})) == 401
    assert status(client, hs256({**good, "exp": now + 7200})) == 401  # longer than JWT_MAX_LIFETIME
    assert status(client, hs256({**good, "iat": now - 7000, "exp": now + 60})) == 401


def _rsa_pem(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "public.pem"
    path.write_bytes(public)
    return key, path


def test_rs256_with_a_public_key_file(make_app, tmp_path):
    key, path = _rsa_pem(tmp_path)
    client = make_app(JWT_PUBLIC_KEY=str(path)).test_client()
    assert status(client, jwt.encode(fresh(), key, algorithm="RS256")) == 200
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert status(client, jwt.encode(fresh(), other, algorithm="RS256")) == 401
    # Algorithm confusion: the public key used as an HMAC secret must not verify.
    public_text = path.read_bytes()
    forged_head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    forged_body = b64(json.dumps(fresh()).encode())
    import hashlib
    import hmac

    mac = hmac.new(public_text, f"{forged_head}.{forged_body}".encode(), hashlib.sha256).digest()
    assert status(client, f"{forged_head}.{forged_body}.{b64(mac)}") == 401


def test_es256_through_a_jwks_file_with_key_rotation(make_app, tmp_path):
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, private in (("old", old), ("new", new)):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
        keys.append({**jwk, "kid": kid, "use": "sig", "alg": "ES256"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    client = make_app(JWT_JWKS_FILE=str(path)).test_client()
    assert status(client, jwt.encode(fresh(), new, algorithm="ES256", headers={"kid": "new"})) == 200
    assert status(client, jwt.encode(fresh(), old, algorithm="ES256", headers={"kid": "old"})) == 200
    assert status(client, jwt.encode(fresh(), old, algorithm="ES256", headers={"kid": "new"})) == 401
    assert status(client, jwt.encode(fresh(), new, algorithm="ES256", headers={"kid": "gone"})) == 401
    assert status(client, jwt.encode(fresh(), new, algorithm="ES256")) == 401  # no kid, several keys


def test_bad_key_configuration_fails_at_startup(upstream, tmp_path):
    from app import create_app
    from app.config import ConfigError
    from tests.conftest import app_config

    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY"):
        create_app(app_config(upstream.url, JWT_PUBLIC_KEY=str(tmp_path / "bad.pem")))
    with pytest.raises(ConfigError, match="JWT_JWKS_FILE"):
        create_app(app_config(upstream.url, JWT_JWKS_FILE=str(tmp_path / "missing.json")))
