"""POST /users/register, POST /users/login, GET /users/me (the older API's paths and payloads)."""

from datetime import datetime

import jwt
import pytest
from emporium_users.models import User
from sqlalchemy import update

from .conftest import bearer, login, register

GENERIC_409 = "Email or username is already registered"
GENERIC_401 = "Invalid email or password"


async def test_register_returns_the_user(client):
    body = await register(client, email="  Ada@Example.COM ", username="ada")
    assert set(body) == {"id", "email", "username", "is_active", "roles", "created_at", "updated_at"}
    assert body["email"] == "ada@example.com"
    assert body["username"] == "ada"
    assert body["is_active"] is True
    assert body["roles"] == ["customer"]
    for field in ("created_at", "updated_at"):
        assert datetime.fromisoformat(body[field]).tzinfo is not None
    assert "password" not in str(body) and "hashed" not in str(body)


@pytest.mark.parametrize(
    "second",
    [
        {"email": "ada@example.com", "username": "other"},
        {"email": "ADA@example.com ", "username": "other"},
        {"email": "other@example.com", "username": "ada"},
    ],
)
async def test_duplicate_email_or_username_is_one_generic_409(client, second):
    await register(client)
    response = await client.post("/users/register", json={**second, "password": "another pass"})
    assert response.status_code == 409
    assert response.json()["detail"] == GENERIC_409
    assert response.json()["code"] == "conflict"


async def test_email_of_one_user_and_username_of_another_is_409_not_500(client):
    await register(client, email="a@example.com", username="alice")
    await register(client, email="b@example.com", username="bob")
    response = await client.post(
        "/users/register", json={"email": "a@example.com", "username": "bob", "password": "whatever1"}
    )
    assert response.status_code == 409
    assert response.json()["detail"] == GENERIC_409


@pytest.mark.parametrize(
    "payload",
    [
        {"email": "not-an-email", "username": "ada", "password": "correct horse"},
        {"email": "ada@example.com", "username": "ad", "password": "correct horse"},
        {"email": "ada@example.com", "username": "a" * 51, "password": "correct horse"},
        {"email": "ada@example.com", "username": "ada", "password": "short"},
        {"email": "ada@example.com", "username": "ada\x00x", "password": "correct horse"},
        {"email": "ada@example.com", "username": "ada", "password": "correct\x00horse"},
        # 37 characters but 74 bytes: over bcrypt's limit, refused rather than silently truncated.
        {"email": "ada@example.com", "username": "ada", "password": "é" * 37},
        {"email": "ada@example.com", "username": "ada", "password": "x" * 73},
        {"email": "ada@example.com", "username": "ada"},
        {"username": "ada", "password": "correct horse"},
        {"email": 5, "username": ["ada"], "password": None},
    ],
)
async def test_register_validation_is_422(client, payload):
    response = await client.post("/users/register", json=payload)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"


async def test_register_accepts_exactly_72_bytes_and_50_characters(client):
    await register(client, username="u" * 50, password="p" * 72)
    await login(client, password="p" * 72)


@pytest.mark.parametrize(
    "content", [b"", b"{", b"null", b"[1]", '{"email": "\ud800"}'.encode("utf-8", "surrogatepass")]
)
async def test_register_bad_json_is_422(client, content):
    response = await client.post(
        "/users/register", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422


async def test_login_returns_tokens(client, settings):
    user = await register(client)
    body = await login(client, email=" ADA@example.com")
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 15 * 60
    assert body["refresh_token"]
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "ES256" and header["kid"]
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert set(claims) >= {"iss", "aud", "sub", "exp", "iat", "nbf", "jti", "email", "roles"}
    assert claims["sub"] == str(user["id"])
    assert claims["iss"] == settings.jwt_issuer and claims["aud"] == settings.jwt_audience
    assert claims["exp"] - claims["iat"] == 15 * 60
    assert claims["email"] == "ada@example.com" and claims["roles"] == ["customer"]


async def test_login_accepts_the_oauth2_password_form(client):
    await register(client)
    response = await client.post(
        "/users/login",
        data={"grant_type": "password", "username": "ada@example.com", "password": "correct horse"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "bearer"
    wrong = await client.post("/users/login", data={"username": "ada@example.com", "password": "nope nope"})
    assert wrong.status_code == 401
    missing = await client.post("/users/login", data={"username": "ada@example.com"})
    assert missing.status_code == 422


async def test_login_failures_are_one_generic_401(client, session):
    user = await register(client)
    await register(client, email="ina@example.com", username="ina")
    await session.exec(update(User).where(User.email == "ina@example.com").values(is_active=False))
    await session.commit()
    cases = [
        {"email": "ada@example.com", "password": "wrong password"},
        {"email": "nobody@example.com", "password": "correct horse"},
        {"email": "ina@example.com", "password": "correct horse"},  # inactive
        {"email": "ada@example.com", "password": "x" * 200},
    ]
    for case in cases:
        response = await client.post("/users/login", json=case)
        assert response.status_code == 401, case
        assert response.json()["detail"] == GENERIC_401
        assert response.headers["www-authenticate"] == "Bearer"
    assert user["id"]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"email": "ada@example.com"},
        {"email": "nope", "password": "x"},
        {"email": "a@b.co", "password": ""},
    ],
)
async def test_login_validation_is_422(client, payload):
    assert (await client.post("/users/login", json=payload)).status_code == 422


async def test_login_with_garbage_body_is_422(client):
    response = await client.post("/users/login", content=b"{", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    response = await client.post("/users/login", content=b"abc", headers={"Content-Type": "text/plain"})
    assert response.status_code == 422


async def test_me(client):
    user = await register(client)
    tokens = await login(client)
    response = await client.get("/users/me", headers=bearer(tokens["access_token"]))
    assert response.status_code == 200
    assert response.json() == user


async def test_me_without_or_with_malformed_token_is_401(client):
    assert (await client.get("/users/me")).status_code == 401
    assert (await client.get("/users/me", headers={"Authorization": "Token abc"})).status_code == 401
    assert (await client.get("/users/me", headers=bearer("abc.def.ghi"))).status_code == 401


async def test_me_for_inactive_or_deleted_user_is_401(client, session):
    await register(client)
    tokens = await login(client)
    await session.exec(update(User).where(User.email == "ada@example.com").values(is_active=False))
    await session.commit()
    assert (await client.get("/users/me", headers=bearer(tokens["access_token"]))).status_code == 401


async def test_oversized_bodies_are_refused_before_they_are_read(client):
    payload = {"email": "big@example.com", "username": "big", "password": "x" * 20_000}
    response = await client.post("/users/register", json=payload)
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    response = await client.post("/users/login", content=b"{" + b" " * 17_000 + b"}")
    assert response.status_code == 413
