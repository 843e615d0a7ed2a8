"""Tokens checked against the published JWKS, refresh-token rotation and reuse detection, key rotation."""

import json
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from emporium_common import testing
from emporium_common.auth import InvalidToken, RemoteKeySet, TokenVerifier
from emporium_users.keys import KeyRing, generate_local_keys, rotate_keys
from emporium_users.main import build_app

from .conftest import bearer, login, register


async def test_jwks_publishes_public_keys_only(client, keys_dir):
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert len(keys) == 2  # current and next (a fresh directory has no previous key yet)
    for key in keys:
        assert {"kid", "alg", "use", "kty"} <= set(key)
        assert key["use"] == "sig" and key["alg"] == "ES256" and key["crv"] == "P-256"
        assert "d" not in key  # no private part
        # P-256 coordinates are 32 bytes each (Envoy rejects anything else).
        assert len(jwt.utils.base64url_decode(key["x"])) == 32
    assert len({k["kid"] for k in keys}) == 2


async def test_openid_configuration(client, settings):
    body = (await client.get("/.well-known/openid-configuration")).json()
    assert body["issuer"] == settings.jwt_issuer
    assert body["jwks_uri"] == "http://test/.well-known/jwks.json"


@pytest.fixture
async def published_verifier(app, settings):
    """What another service (or Istio) does: fetch the JWKS over HTTP and verify with it."""
    keys = RemoteKeySet("http://users/.well-known/jwks.json", transport=httpx.ASGITransport(app=app))
    return TokenVerifier(keys, issuer=settings.jwt_issuer, audience=settings.jwt_audience)


async def test_token_verifies_with_the_published_jwks(client, published_verifier):
    user = await register(client)
    tokens = await login(client)
    principal = await published_verifier.verify(tokens["access_token"])
    assert principal.sub == str(user["id"])
    assert principal.email == "ada@example.com" and principal.roles == {"customer"}


def _claims(settings, **overrides):
    now = int(time.time())
    claims = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": "1",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "x",
        "email": "ada@example.com",
        "roles": ["admin"],
    }
    return {**claims, **overrides}


def _sign(app, claims, **kwargs):
    key = app.state.keys.current
    return jwt.encode(claims, key.private_key, algorithm="ES256", headers={"kid": key.kid}, **kwargs)


def _bad_tokens(app, settings, valid_token):
    current = app.state.keys.current
    header, payload, signature = valid_token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["roles"] = ["admin"]
    tampered = f"{header}.{jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()}.{signature}"
    none_header = jwt.utils.base64url_encode(
        json.dumps({"alg": "none", "kid": current.kid}).encode()
    ).decode()
    stranger = ec.generate_private_key(ec.SECP256R1())
    return {
        "unknown key, known kid": jwt.encode(
            _claims(settings), stranger, algorithm="ES256", headers={"kid": current.kid}
        ),
        "unknown kid": jwt.encode(
            _claims(settings), stranger, algorithm="ES256", headers={"kid": "stranger"}
        ),
        "expired": _sign(app, _claims(settings, iat=int(time.time()) - 3600, exp=int(time.time()) - 1800)),
        "alg none": f"{none_header}.{payload}.",
        "wrong audience": _sign(app, _claims(settings, aud="another-app")),
        "wrong issuer": _sign(app, _claims(settings, iss="https://evil.example")),
        "tampered payload": tampered,
        "HS256 with the public key": jwt.encode(
            _claims(settings), "k" * 32, algorithm="HS256", headers={"kid": current.kid}
        ),
    }


async def test_bad_tokens_are_rejected_everywhere(client, app, settings, published_verifier):
    await register(client)
    valid = (await login(client))["access_token"]
    assert (await client.get("/users/me", headers=bearer(valid))).status_code == 200
    for name, token in _bad_tokens(app, settings, valid).items():
        response = await client.get("/users/me", headers=bearer(token))
        assert response.status_code == 401, name
        assert response.json()["detail"] == "Could not validate credentials"
        with pytest.raises(InvalidToken):
            await published_verifier.verify(token)


async def test_refresh_rotates_and_reuse_revokes_the_family(client):
    await register(client)
    first = await login(client)
    second = (await client.post("/users/refresh", json={"refresh_token": first["refresh_token"]})).json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert (await client.get("/users/me", headers=bearer(second["access_token"]))).status_code == 200

    # The spent token shows up again: someone copied it. Both it and its successor stop working.
    reuse = await client.post("/users/refresh", json={"refresh_token": first["refresh_token"]})
    assert reuse.status_code == 401
    assert reuse.json()["detail"] == "Invalid refresh token"
    successor = await client.post("/users/refresh", json={"refresh_token": second["refresh_token"]})
    assert successor.status_code == 401

    # Another login (another family) is unaffected.
    third = await login(client)
    assert (
        await client.post("/users/refresh", json={"refresh_token": third["refresh_token"]})
    ).status_code == 200


async def test_refresh_with_unknown_or_invalid_token(client):
    assert (await client.post("/users/refresh", json={"refresh_token": "nope"})).status_code == 401
    assert (await client.post("/users/refresh", json={})).status_code == 422
    assert (await client.post("/users/refresh", json={"refresh_token": ""})).status_code == 422


async def test_logout_revokes_the_session(client):
    await register(client)
    tokens = await login(client)
    other_device = await login(client)
    assert (
        await client.post("/users/logout", json={"refresh_token": tokens["refresh_token"]})
    ).status_code == 204
    assert (
        await client.post("/users/refresh", json={"refresh_token": tokens["refresh_token"]})
    ).status_code == 401
    # Only that session: the other login keeps working.
    assert (
        await client.post("/users/refresh", json={"refresh_token": other_device["refresh_token"]})
    ).status_code == 200
    # Logging out twice, or with an unknown token, says nothing.
    assert (
        await client.post("/users/logout", json={"refresh_token": tokens["refresh_token"]})
    ).status_code == 204
    assert (await client.post("/users/logout", json={"refresh_token": "unknown"})).status_code == 204


async def test_key_rotation_keeps_old_tokens_valid_until_retired(settings, session, tmp_path):
    keys_dir = tmp_path / "keys"
    generate_local_keys(keys_dir)
    keys = KeyRing(keys_dir)
    app = build_app(settings.model_copy(update={"jwt_keys_dir": keys_dir}), keys)
    async with testing.app_client(app, session) as client:
        await register(client)
        old = (await login(client))["access_token"]
        old_kid = jwt.get_unverified_header(old)["kid"]
        announced_next = keys.jwks()["keys"][1]["kid"]

        rotate_keys(keys_dir)
        keys.reload()  # the service notices changed files by itself within seconds; tests don't wait
        new = (await login(client))["access_token"]
        assert jwt.get_unverified_header(new)["kid"] == announced_next  # next became current
        published = {k["kid"] for k in (await client.get("/.well-known/jwks.json")).json()["keys"]}
        assert old_kid in published and announced_next in published and len(published) == 3
        assert (await client.get("/users/me", headers=bearer(old))).status_code == 200
        assert (await client.get("/users/me", headers=bearer(new))).status_code == 200

        rotate_keys(keys_dir)  # the old key is retired now
        keys.reload()
        published = {k["kid"] for k in (await client.get("/.well-known/jwks.json")).json()["keys"]}
        assert old_kid not in published
        assert (await client.get("/users/me", headers=bearer(old))).status_code == 401
        assert (await client.get("/users/me", headers=bearer(new))).status_code == 200


def test_rsa_keys_sign_rs256(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "current.pem").write_bytes(pem)
    keys = KeyRing(tmp_path)
    assert keys.current.alg == "RS256"
    jwk = keys.jwks()["keys"][0]
    assert jwk["kty"] == "RSA" and jwk["alg"] == "RS256" and "d" not in jwk and "p" not in jwk


def test_missing_current_key_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        KeyRing(tmp_path)
