"""The app factory: probes, error shape, request ids, metrics, authentication."""

import asyncio
import json
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from emporium_common import (
    AppError,
    CurrentPrincipal,
    SessionDep,
    Settings,
    create_app,
    require_role,
    testing,
)
from emporium_common.auth import (
    LEEWAY_SECONDS,
    InvalidToken,
    KeysUnavailable,
    RemoteKeySet,
    StaticKeySet,
    TokenVerifier,
)
from fastapi import APIRouter, Depends, FastAPI, Response
from pydantic import BaseModel, Field
from sqlalchemy import text

router = APIRouter(tags=["demo"])


class Item(BaseModel):
    name: str = Field(min_length=1)
    quantity: int = Field(ge=1)


@router.post("/items/{item_id}", status_code=201)
async def create_item(item_id: int, item: Item) -> dict:
    return {"id": item_id, **item.model_dump()}


@router.get("/boom")
async def boom() -> dict:
    raise RuntimeError("secret internals")


@router.get("/conflict")
async def conflict() -> dict:
    raise AppError(409, "Already there", "duplicate")


@router.get("/db")
async def db(session: SessionDep) -> dict:
    return {"one": (await session.exec(text("SELECT 1"))).scalar_one()}


@router.get("/me")
async def me(principal: CurrentPrincipal) -> dict:
    return {"sub": principal.sub, "email": principal.email, "roles": sorted(principal.roles)}


@router.get("/admin", dependencies=[Depends(require_role("admin"))])
async def admin() -> dict:
    return {"ok": True}


tokens = testing.TokenFactory()


def make_app(database_url: str, **kwargs) -> FastAPI:
    settings = Settings(service_name="demo", database_url=database_url)
    return create_app(settings, [router], token_verifier=tokens.verifier(), **kwargs)


@pytest.fixture(scope="module")
def app(common_database_url) -> FastAPI:
    return make_app(common_database_url)


@pytest.fixture
async def client(app):
    async with testing.app_client(app) as client:
        yield client


async def test_liveness_and_readiness(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    health = (await client.get("/health")).json()
    assert health["checks"]["database"]["status"] == "up"


async def test_readiness_503_when_database_is_down(postgres):
    app = make_app(postgres.dsn("postgres").replace(f":{postgres.port}/", ":1/"))
    async with testing.app_client(app) as client:
        assert (await client.get("/healthz")).status_code == 200
        response = await client.get("/readyz")
        assert response.status_code == 503
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["checks"]["database"]["status"] == "down"
        # A request needing the database is a retryable 503, not a 500.
        response = await client.get("/db")
        assert response.status_code == 503
        assert response.json()["code"] == "service_unavailable"
        assert response.headers["retry-after"] == "1"


async def test_readiness_checks_the_broker_when_asked(common_database_url, rabbitmq):
    settings = Settings(service_name="demo", database_url=common_database_url, amqp_url=rabbitmq.amqp_url)
    app = create_app(settings, [router], check_broker=True)
    async with testing.app_client(app) as client:
        body = (await client.get("/health")).json()
        assert body["checks"]["broker"]["status"] == "up"
    bad = settings.model_copy(update={"amqp_url": "amqp://guest:guest@127.0.0.1:1/"})
    app = create_app(bad, [router], check_broker=True)
    async with testing.app_client(app) as client:
        assert (await client.get("/readyz")).status_code == 503


async def test_extra_readiness_check(common_database_url):
    async def failing() -> None:
        raise ConnectionError("down")

    app = make_app(common_database_url, readiness_checks={"search": failing})
    async with testing.app_client(app) as client:
        response = await client.get("/health")
        assert response.status_code == 503
        assert response.json()["checks"]["search"] == {"status": "down", "error": "ConnectionError"}


async def test_session_dependency_reaches_the_database(client):
    assert (await client.get("/db")).json() == {"one": 1}


async def test_request_id_is_generated_and_echoed(client):
    generated = await client.get("/healthz")
    assert len(generated.headers["x-request-id"]) == 32
    echoed = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    # Log injection attempts are replaced, not echoed.
    weird = await client.get("/healthz", headers={"X-Request-ID": "a b\tc" + "x" * 300})
    assert weird.headers["x-request-id"] != "a b\tc" + "x" * 300


async def test_error_shape_for_404_409_422(client):
    missing = await client.get("/nowhere", headers={"X-Request-ID": "rid-1"})
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Not Found", "code": "not_found", "request_id": "rid-1"}

    conflict = await client.get("/conflict")
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "duplicate"

    invalid = await client.post("/items/x", json={"name": "", "quantity": 0})
    assert invalid.status_code == 422
    body = invalid.json()
    assert body["code"] == "validation_error"
    assert {tuple(e["loc"]) for e in body["detail"]} >= {("path", "item_id"), ("body", "name")}
    assert body["request_id"]


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"\xff\xfe",
        b"[]",
        b'"text"',
        json.dumps({"name": "x" * 10, "quantity": "1e999"}).encode(),
    ],
)
async def test_bad_bodies_are_422_never_500(client, content):
    response = await client.post("/items/1", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"


async def test_unhandled_error_is_a_generic_500(client):
    response = await client.get("/boom", headers={"X-Request-ID": "rid-500"})
    assert response.status_code == 500
    assert response.json() == {
        "detail": "Internal server error",
        "code": "internal_error",
        "request_id": "rid-500",
    }
    assert response.headers["x-request-id"] == "rid-500"


async def test_metrics_use_route_templates(client):
    await client.post("/items/7", json={"name": "a", "quantity": 1})
    await client.get("/boom")
    text_ = (await client.get("/metrics")).text
    assert (
        'emporium_http_requests_total{method="POST",route="/items/{item_id}",service="demo",status="201"}'
        in text_
    )
    assert 'emporium_http_requests_total{method="GET",route="/boom",service="demo",status="500"}' in text_
    assert "emporium_http_request_duration_seconds_bucket{" in text_
    assert "emporium_http_requests_in_progress{" in text_


async def test_valid_token_gives_the_principal(client):
    headers = tokens.auth_header("42", email="a@example.com", roles=["customer"])
    response = await client.get("/me", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"sub": "42", "email": "a@example.com", "roles": ["customer"]}


async def test_role_guard(client):
    assert (await client.get("/admin", headers=tokens.auth_header(roles=["customer"]))).status_code == 403
    assert (await client.get("/admin", headers=tokens.auth_header(roles=["admin"]))).status_code == 200
    assert (await client.get("/admin")).status_code == 401


def _forge(claims_overrides=None, *, key=None, headers=None, algorithm="ES256"):
    now = int(time.time())
    claims = {
        "iss": tokens.issuer,
        "aud": tokens.audience,
        "sub": "1",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "j",
        "roles": [],
    }
    claims.update(claims_overrides or {})
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(
        claims,
        key or tokens.private_key,
        algorithm=algorithm,
        headers={"kid": tokens.kid} if headers is None else headers,
    )


def _alg_none_token() -> str:
    good = tokens.token()
    _, payload, _ = good.split(".")
    none_header = jwt.utils.base64url_encode(json.dumps({"alg": "none", "kid": tokens.kid}).encode()).decode()
    return f"{none_header}.{payload}."


def _tampered() -> str:
    header, payload, signature = tokens.token(roles=["customer"]).split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["roles"] = ["admin"]
    forged = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    return f"{header}.{forged}.{signature}"


BAD_TOKENS = {
    "expired": lambda: _forge({"exp": int(time.time()) - 120, "iat": int(time.time()) - 1000}),
    "not yet valid": lambda: _forge({"nbf": int(time.time()) + 600}),
    "wrong audience": lambda: _forge({"aud": "someone-else"}),
    "wrong issuer": lambda: _forge({"iss": "https://evil.example"}),
    "missing jti": lambda: _forge({"jti": None}),
    "unknown key": lambda: _forge(key=ec.generate_private_key(ec.SECP256R1())),
    "unknown kid": lambda: _forge(headers={"kid": "nope"}),
    "no kid": lambda: _forge(headers={}),
    "alg none": _alg_none_token,
    "hmac with public key": lambda: jwt.encode(
        {"sub": "1"}, "x" * 32, algorithm="HS256", headers={"kid": tokens.kid}
    ),
    "rsa header on ec key": lambda: _forge(key=rsa.generate_private_key(65537, 2048), algorithm="RS256"),
    "tampered payload": _tampered,
    "garbage": lambda: "not.a.token",
    "roles not a list": lambda: _forge({"roles": "admin"}),
}


@pytest.mark.parametrize("name", list(BAD_TOKENS))
async def test_bad_tokens_are_401(client, name):
    response = await client.get("/me", headers={"Authorization": f"Bearer {BAD_TOKENS[name]()}"})
    assert response.status_code == 401, name
    assert response.json()["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_missing_or_malformed_authorization_header(client):
    assert (await client.get("/me")).status_code == 401
    assert (await client.get("/me", headers={"Authorization": "Basic abc"})).status_code == 401
    assert (await client.get("/me", headers={"Authorization": "Bearer"})).status_code == 401


async def test_remote_key_set_fetches_caches_and_refetches_on_new_kid():
    old, new = testing.TokenFactory(), testing.TokenFactory()
    published = {"jwks": old.jwks}
    fetches = []
    jwks_app = FastAPI()

    @jwks_app.get("/.well-known/jwks.json")
    def jwks() -> dict:
        fetches.append(1)
        return published["jwks"]

    keys = RemoteKeySet(
        "http://users/.well-known/jwks.json",
        min_refresh_seconds=0,
        transport=httpx.ASGITransport(app=jwks_app),
    )
    verifier = TokenVerifier(keys, issuer=old.issuer, audience=old.audience)
    assert (await verifier.verify(old.token("7"))).sub == "7"
    assert (await verifier.verify(old.token("8"))).sub == "8"
    assert len(fetches) == 1  # cached
    # Rotation: a token with a kid not seen before makes the verifier refetch once.
    published["jwks"] = {"keys": old.jwks["keys"] + new.jwks["keys"]}
    assert (await verifier.verify(new.token("9"))).sub == "9"
    assert len(fetches) == 2


async def test_static_key_set_accepts_rsa_keys():
    key = rsa.generate_private_key(65537, 2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="r1", alg="RS256", use="sig")
    verifier = TokenVerifier(StaticKeySet({"keys": [jwk]}), issuer="i", audience="a")
    now = int(time.time())
    claims = {"iss": "i", "aud": "a", "sub": "5", "iat": now, "nbf": now, "exp": now + 60, "jti": "x"}
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "r1"})
    assert (await verifier.verify(token)).sub == "5"


async def test_remote_key_set_keeps_cached_keys_when_the_issuer_is_down():
    issuer = testing.TokenFactory()
    state = {"up": True}
    jwks_app = FastAPI()

    @jwks_app.get("/jwks")
    def jwks(response: Response) -> dict:
        if not state["up"]:
            response.status_code = 503
            return {}
        return issuer.jwks

    keys = RemoteKeySet(
        "http://users/jwks",
        cache_seconds=0,
        min_refresh_seconds=0,
        transport=httpx.ASGITransport(app=jwks_app),
    )
    verifier = TokenVerifier(keys, issuer=issuer.issuer, audience=issuer.audience)
    assert (await verifier.verify(issuer.token("1"))).sub == "1"
    state["up"] = False
    assert (await verifier.verify(issuer.token("2"))).sub == "2"


async def test_remote_key_set_without_any_keys_is_unavailable_not_invalid():
    jwks_app = FastAPI()

    @jwks_app.get("/jwks")
    def jwks() -> dict:
        return {"not": "a key set"}

    keys = RemoteKeySet("http://users/jwks", transport=httpx.ASGITransport(app=jwks_app))
    verifier = TokenVerifier(keys, issuer=tokens.issuer, audience=tokens.audience)
    with pytest.raises(KeysUnavailable):
        await verifier.verify(tokens.token())


async def test_cold_pod_with_the_issuer_down_answers_503_not_401(common_database_url):
    issuer_down = FastAPI()

    @issuer_down.get("/jwks")
    def jwks(response: Response) -> dict:
        response.status_code = 503
        return {}

    keys = RemoteKeySet("http://users/jwks", transport=httpx.ASGITransport(app=issuer_down))
    settings = Settings(service_name="demo", database_url=common_database_url)
    app = create_app(
        settings, [router], token_verifier=TokenVerifier(keys, issuer=tokens.issuer, audience=tokens.audience)
    )
    async with testing.app_client(app) as client:
        response = await client.get("/me", headers=tokens.auth_header("1"))
    assert response.status_code == 503
    assert response.json()["code"] == "service_unavailable"
    assert int(response.headers["retry-after"]) > 0


async def test_stale_keys_are_served_while_one_refresh_runs_without_blocking_requests():
    issuer = testing.TokenFactory()
    slow, fetches = asyncio.Event(), []
    jwks_app = FastAPI()

    @jwks_app.get("/jwks")
    async def jwks() -> dict:
        fetches.append(1)
        if len(fetches) > 1:
            await slow.wait()  # the issuer hangs from the second fetch on
        return issuer.jwks

    keys = RemoteKeySet(
        "http://users/jwks",
        cache_seconds=0,  # stale at once
        min_refresh_seconds=0,
        timeout=30,
        transport=httpx.ASGITransport(app=jwks_app),
    )
    verifier = TokenVerifier(keys, issuer=issuer.issuer, audience=issuer.audience)
    assert (await verifier.verify(issuer.token("1"))).sub == "1"
    # 20 concurrent requests while the refresh hangs: all answered from the cached keys, at once.
    started = time.monotonic()
    principals = await asyncio.wait_for(
        asyncio.gather(*(verifier.verify(issuer.token(str(i))) for i in range(20))), timeout=5
    )
    assert [p.sub for p in principals] == [str(i) for i in range(20)]
    assert time.monotonic() - started < 2
    assert len(fetches) == 2  # one background refresh for all of them, not one each
    slow.set()


async def test_a_verified_token_is_remembered_but_still_expires_and_dies_with_its_key():
    issuer = testing.TokenFactory()
    now = [time.time()]
    jwks = issuer.jwks
    verifier = TokenVerifier(
        StaticKeySet(lambda: jwks), issuer=issuer.issuer, audience=issuer.audience, clock=lambda: now[0]
    )
    token = issuer.token(sub="7", ttl=60)
    first = await verifier.verify(token)
    assert (await verifier.verify(token)) is first  # remembered: no second signature check
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    with pytest.raises(InvalidToken):  # another string is verified on its own
        await verifier.verify(tampered)
    now[0] += 60 + LEEWAY_SECONDS
    with pytest.raises(InvalidToken, match="expired"):
        await verifier.verify(token)
    now[0] -= 60 + LEEWAY_SECONDS
    assert (await verifier.verify(token)).sub == "7"
    jwks = {"keys": []}  # the key is rotated out: its tokens end at once
    with pytest.raises(InvalidToken, match="unknown kid"):
        await verifier.verify(token)
