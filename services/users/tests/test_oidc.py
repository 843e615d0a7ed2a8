"""Sign-in with an OpenID Connect provider, against a real one (the test bed's mock-oauth2-server).

The provider's login page plays the person: it takes the ``sub`` and the claims to put in the ID token,
so each test signs in as the user it needs, or gets the ID token an attacker would bring.
"""

import json
import logging
import secrets
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from emporium_common import testing
from emporium_users.main import build_app
from emporium_users.oidc import LoginRefused
from emporium_users.oidc_config import OIDCProvider
from sqlalchemy import text

from .conftest import bearer, login, register


@pytest.fixture(scope="session")
def oidc_app(settings, oidc_provider):
    providers = [
        OIDCProvider(
            name="mock",
            display_name="Mock ID",
            issuer=oidc_provider.issuer("shop"),
            client_id="emporium-web",
            client_secret="not-so-secret",
        ),
        OIDCProvider(
            name="trusted",
            display_name="Trusted ID",
            issuer=oidc_provider.issuer("trusted"),
            client_id="emporium-web",
            auto_link_verified_email=True,
        ),
        # Nothing listens there: the provider is down.
        OIDCProvider(name="down", display_name="Down", issuer="http://127.0.0.1:9/down", client_id="x"),
    ]
    oidc_settings = settings.model_copy(
        update={
            "oidc_providers": providers,
            "oidc_cookie_secure": False,  # the test client speaks plain HTTP
            "oidc_allowed_return_origins": ["https://shop.example.com"],
        }
    )
    return build_app(oidc_settings)


@pytest.fixture
async def client(oidc_app, session):
    async with testing.app_client(oidc_app, session) as client:
        yield client


def new_sub() -> str:
    return f"sub-{secrets.token_hex(6)}"


async def start(client, provider="mock", **params) -> str:
    response = await client.get(f"/auth/oidc/{provider}/start", params=params)
    assert response.status_code == 302, response.text
    assert response.headers["cache-control"] == "no-store"
    return response.headers["location"]


async def callback(client, callback_url: str, **replace):
    parts = urlsplit(callback_url)
    assert parts.path.startswith("/auth/oidc/")
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(replace)
    return await client.get(parts.path, params=query)


async def sign_in(client, oidc_provider, sub, claims, provider="mock"):
    """start -> the provider's login page -> the callback; returns the callback's response."""
    authorize_url = await start(client, provider)
    return await callback(client, oidc_provider.sign_in(authorize_url, sub, claims))


async def tokens_for(client, response) -> dict:
    assert response.status_code == 200, response.text
    exchanged = await client.post("/auth/oidc/token", json={"code": response.json()["code"]})
    assert exchanged.status_code == 200, exchanged.text
    return exchanged.json()


async def me(client, tokens) -> dict:
    response = await client.get("/users/me", headers=bearer(tokens["access_token"]))
    assert response.status_code == 200, response.text
    return response.json()


def refused(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code, response.text


async def test_providers_are_listed_for_sign_in_buttons(client):
    response = await client.get("/auth/oidc/providers")
    assert response.status_code == 200
    assert [(p["name"], p["display_name"], p["start_url"]) for p in response.json()][:2] == [
        ("mock", "Mock ID", "/auth/oidc/mock/start"),
        ("trusted", "Trusted ID", "/auth/oidc/trusted/start"),
    ]


async def test_start_uses_pkce_state_and_nonce(client, oidc_provider):
    location = await start(client)
    assert location.startswith(oidc_provider.issuer("shop") + "/authorize?")
    query = parse_qs(urlsplit(location).query)
    assert query["response_type"] == ["code"]
    assert query["client_id"] == ["emporium-web"]
    assert query["redirect_uri"] == ["http://test/auth/oidc/mock/callback"]
    assert query["code_challenge_method"] == ["S256"]
    assert len(query["code_challenge"][0]) == 43
    assert len(query["state"][0]) >= 43 and len(query["nonce"][0]) >= 43
    assert set(query["scope"][0].split()) == {"openid", "email", "profile"}
    assert "emporium_oidc" in client.cookies


async def test_sign_up_then_sign_in_again(client, session, oidc_provider, caplog):
    caplog.set_level(logging.INFO)
    sub, email = new_sub(), f"{secrets.token_hex(4)}@example.com"
    claims = {"email": email, "email_verified": True, "preferred_username": "grace"}
    first = await sign_in(client, oidc_provider, sub, claims)
    assert first.headers["cache-control"] == "no-store"
    tokens = await tokens_for(client, first)
    account = await me(client, tokens)
    assert account["email"] == email
    assert account["username"].startswith("grace")
    assert account["roles"] == ["customer"]

    # Welcomed like a registration: one user.registered, through the outbox.
    events = (
        await session.exec(
            text("SELECT type, payload FROM outbox WHERE payload->'data'->>'email' = :email").bindparams(
                email=email
            )
        )
    ).all()
    assert [(kind, payload["data"]["user_id"]) for kind, payload in events] == [
        ("user.registered", str(account["id"]))
    ]

    again = await tokens_for(client, await sign_in(client, oidc_provider, sub, claims))
    assert (await me(client, again))["id"] == account["id"]
    # The account has no password: password login stays closed.
    response = await client.post("/users/login", json={"email": email, "password": "anything-at-all"})
    assert response.status_code == 401
    # Neither our tokens nor the provider's ever reach the logs.
    assert tokens["access_token"] not in caplog.text and tokens["refresh_token"] not in caplog.text
    assert "eyJ" not in caplog.text


async def test_the_same_email_at_another_sub_is_another_identity(client, oidc_provider):
    email = f"{secrets.token_hex(4)}@example.com"
    claims = {"email": email, "email_verified": True}
    await tokens_for(client, await sign_in(client, oidc_provider, new_sub(), claims))
    # Same email, other subject, provider without auto-linking: not silently the same account.
    refused(await sign_in(client, oidc_provider, new_sub(), claims), 409, "oidc_link_required")


async def test_callback_ends_in_a_one_time_code_on_return_to(client, oidc_provider):
    authorize_url = await start(client, return_to="/account?tab=orders")
    callback_url = oidc_provider.sign_in(
        authorize_url, new_sub(), {"email": f"{secrets.token_hex(4)}@example.com"}
    )
    response = await callback(client, callback_url)
    assert response.status_code == 303, response.text
    location = urlsplit(response.headers["location"])
    assert location.path == "/account"
    query = parse_qs(location.query)
    assert query["tab"] == ["orders"] and set(query) == {"tab", "login_code"}
    assert "eyJ" not in response.headers["location"]  # no JWT in the URL
    assert response.headers["referrer-policy"] == "no-referrer"
    code = query["login_code"][0]
    assert (await client.post("/auth/oidc/token", json={"code": code})).status_code == 200
    # The code works once.
    refused(await client.post("/auth/oidc/token", json={"code": code}), 400, "oidc_invalid_code")


async def test_a_refusal_goes_back_to_return_to_with_its_code(client, oidc_provider):
    # The browser's own login (state and cookie match): the page, not raw JSON, tells the person why.
    authorize_url = await start(client, return_to="/login/oidc?next=/cart")
    callback_url = oidc_provider.sign_in(authorize_url, new_sub(), {"nonce": "not-this-login"})
    response = await callback(client, callback_url)
    assert response.status_code == 303, response.text
    location = urlsplit(response.headers["location"])
    assert location.path == "/login/oidc"
    assert parse_qs(location.query) == {"next": ["/cart"], "login_error": ["oidc_nonce_mismatch"]}
    # A forged state never gets there: no trusted return_to without the login's own state.
    refused(await callback(client, callback_url, state="forged"), 400, "oidc_invalid_state")


@pytest.mark.parametrize("return_to", ["https://evil.example/x", "//evil.example/x", "account", "/\\evil"])
async def test_return_to_is_never_an_open_redirect(client, return_to):
    response = await client.get("/auth/oidc/mock/start", params={"return_to": return_to})
    refused(response, 400, "oidc_invalid_return_to")


async def test_return_to_on_an_allowed_origin(client):
    response = await client.get(
        "/auth/oidc/mock/start", params={"return_to": "https://shop.example.com/done"}
    )
    assert response.status_code == 302


async def test_unverified_email_never_links_an_existing_account(client, oidc_provider):
    email = f"{secrets.token_hex(4)}@example.com"
    await register(client, email=email, username=f"u{secrets.token_hex(4)}")
    claims = {"email": email, "email_verified": False}
    # Not even with the operator's auto-linking.
    for provider in ("mock", "trusted"):
        authorize_url = await start(client, provider)
        response = await callback(client, oidc_provider.sign_in(authorize_url, new_sub(), claims))
        refused(response, 403, "oidc_email_not_verified")
    # The string "false" (or anything but true) is not verified either.
    response = await sign_in(
        client, oidc_provider, new_sub(), {**claims, "email_verified": "false"}, "trusted"
    )
    refused(response, 403, "oidc_email_not_verified")


async def test_verified_email_links_only_where_the_operator_allows_it(client, oidc_provider):
    email = f"{secrets.token_hex(4)}@example.com"
    local = await register(client, email=email, username=f"u{secrets.token_hex(4)}")
    claims = {"email": email, "email_verified": True}
    refused(await sign_in(client, oidc_provider, new_sub(), claims, "mock"), 409, "oidc_link_required")
    sub = new_sub()
    tokens = await tokens_for(client, await sign_in(client, oidc_provider, sub, claims, "trusted"))
    assert (await me(client, tokens))["id"] == local["id"]
    # From now on the (issuer, sub) pair signs in to it.
    tokens = await tokens_for(client, await sign_in(client, oidc_provider, sub, {}, "trusted"))
    assert (await me(client, tokens))["id"] == local["id"]


async def test_a_signed_in_user_links_a_provider(client, oidc_provider):
    email = f"{secrets.token_hex(4)}@example.com"
    local = await register(client, email=email, username=f"u{secrets.token_hex(4)}")
    access = (await login(client, email=email))["access_token"]
    assert (await client.post("/auth/oidc/mock/link", json={})).status_code == 401

    async def link(sub, claims):
        response = await client.post("/auth/oidc/mock/link", json={}, headers=bearer(access))
        assert response.status_code == 200, response.text
        return await callback(
            client, oidc_provider.sign_in(response.json()["authorization_url"], sub, claims)
        )

    # Ownership is proven by the password login; the provider must still have verified its email.
    refused(
        await link(new_sub(), {"email": "else@example.com", "email_verified": False}),
        403,
        "oidc_email_not_verified",
    )
    sub = new_sub()
    tokens = await tokens_for(client, await link(sub, {"email": "else@example.com", "email_verified": True}))
    assert (await me(client, tokens))["id"] == local["id"]
    tokens = await tokens_for(client, await sign_in(client, oidc_provider, sub, {}))
    assert (await me(client, tokens))["id"] == local["id"]

    # That identity cannot be linked to a second account.
    other_email = f"{secrets.token_hex(4)}@example.com"
    await register(client, email=other_email, username=f"u{secrets.token_hex(4)}")
    access = (await login(client, email=other_email))["access_token"]
    refused(await link(sub, {"email_verified": True}), 409, "oidc_identity_in_use")


async def test_forged_state_is_refused(client, oidc_provider):
    callback_url = oidc_provider.sign_in(await start(client), new_sub(), {"email": "x@example.com"})
    refused(await callback(client, callback_url, state=secrets.token_urlsafe(32)), 400, "oidc_invalid_state")
    refused(await callback(client, callback_url, state=""), 400, "oidc_invalid_state")


async def test_a_callback_from_another_browser_is_refused(client, oidc_app, session, oidc_provider):
    # Login CSRF: the attacker starts a login and sends the victim the callback link.
    callback_url = oidc_provider.sign_in(await start(client), new_sub(), {"email": "x@example.com"})
    async with testing.app_client(oidc_app, session) as victim:
        refused(await callback(victim, callback_url), 400, "oidc_invalid_state")


async def test_a_replayed_callback_is_refused(client, oidc_provider):
    claims = {"email": f"{secrets.token_hex(4)}@example.com"}
    callback_url = oidc_provider.sign_in(await start(client), new_sub(), claims)
    assert (await callback(client, callback_url)).status_code == 200
    refused(await callback(client, callback_url), 400, "oidc_invalid_state")


async def test_a_code_from_another_login_fails_pkce(client, oidc_provider):
    # Code injection: a code issued to one login (its PKCE challenge) brought to another login's state.
    first = await start(client)
    second = await start(client)
    stolen = oidc_provider.sign_in(second, new_sub(), {"email": "x@example.com"})
    own_state = parse_qs(urlsplit(first).query)["state"][0]
    refused(await callback(client, stolen, state=own_state), 400, "oidc_code_rejected")


async def test_a_replayed_provider_code_is_refused(client, oidc_provider):
    claims = {"email": f"{secrets.token_hex(4)}@example.com"}
    callback_url = oidc_provider.sign_in(await start(client), new_sub(), claims)
    code = parse_qs(urlsplit(callback_url).query)["code"][0]
    assert (await callback(client, callback_url)).status_code == 200
    # The same provider code with a fresh, valid state: the provider refuses it (used codes are gone).
    fresh_state = parse_qs(urlsplit(await start(client)).query)["state"][0]
    refused(await callback(client, callback_url, state=fresh_state, code=code), 400, "oidc_code_rejected")


@pytest.mark.parametrize(
    ("claims", "code", "reason"),
    [
        ({"nonce": "not-this-login"}, "oidc_nonce_mismatch", "nonce"),
        ({"aud": "someone-else"}, "oidc_invalid_id_token", "another audience"),
        ({"aud": ["someone-else", "another"]}, "oidc_invalid_id_token", "another audience"),
        ({"iss": "http://127.0.0.1:1/elsewhere"}, "oidc_invalid_id_token", "another issuer"),
        ({"exp": 1_000_000_000}, "oidc_invalid_id_token", "expired"),
    ],
)
async def test_an_id_token_that_is_not_for_this_login_is_refused(client, oidc_provider, claims, code, reason):
    response = await sign_in(client, oidc_provider, new_sub(), {"email": "x@example.com", **claims})
    refused(response, 400, code)
    assert reason in response.json()["detail"]


async def _genuine_id_token(oidc_provider, issuer_id: str, nonce: str, claims: dict) -> str:
    """An ID token straight from the provider's issuer ``issuer_id`` (code flow without us)."""
    query = {
        "response_type": "code",
        "client_id": "emporium-web",
        "redirect_uri": "http://test/cb",
        "scope": "openid",
        "state": "s",
        "nonce": nonce,
    }
    issuer = oidc_provider.issuer(issuer_id)
    callback_url = oidc_provider.sign_in(f"{issuer}/authorize?{urlencode(query)}", new_sub(), claims)
    code = parse_qs(urlsplit(callback_url).query)["code"][0]
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": "http://test/cb"}
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{issuer}/token", data=form, auth=("emporium-web", "x"))
    assert response.status_code == 200, response.text
    return response.json()["id_token"]


async def test_an_id_token_of_another_issuer_is_refused(oidc_app, oidc_provider):
    mock = oidc_app.state.oidc_clients["mock"]
    token = await _genuine_id_token(oidc_provider, "shop", "n1", {})
    assert (await mock.verify_id_token(token, nonce="n1")).subject  # the control: ours verifies
    # Another issuer's token, as is: refused for its issuer.
    token = await _genuine_id_token(oidc_provider, "elsewhere", "n2", {})
    with pytest.raises(LoginRefused, match=r"another issuer|unknown key"):
        await mock.verify_id_token(token, nonce="n2")
    # Another issuer's token claiming to be ours: signed with a key that is not ours.
    token = await _genuine_id_token(oidc_provider, "elsewhere", "n3", {"iss": oidc_provider.issuer("shop")})
    with pytest.raises(LoginRefused, match="unknown key"):
        await mock.verify_id_token(token, nonce="n3")


async def test_the_provider_saying_no(client, oidc_provider):
    state = parse_qs(urlsplit(await start(client)).query)["state"][0]
    response = await client.get(
        "/auth/oidc/mock/callback?" + urlencode({"state": state, "error": "access_denied"})
    )
    refused(response, 400, "oidc_provider_error")
    assert "access_denied" in response.json()["detail"]


async def test_unknown_provider_and_provider_down(client):
    refused(await client.get("/auth/oidc/nope/start"), 404, "not_found")
    refused(await client.get("/auth/oidc/nope/callback?state=x&code=y"), 404, "not_found")
    refused(await client.get("/auth/oidc/down/start"), 503, "provider_unavailable")


async def test_login_code_must_be_known(client):
    refused(await client.post("/auth/oidc/token", json={"code": "made-up"}), 400, "oidc_invalid_code")
    assert (await client.post("/auth/oidc/token", json={})).status_code == 422


def test_provider_configuration_from_the_environment(monkeypatch, tmp_path):
    from emporium_users.config import UsersSettings

    (tmp_path / "google").write_text("from-the-secret\n")
    monkeypatch.setenv("OIDC_CLIENT_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("OIDC_CLIENT_SECRET_CORP_SSO", "from-the-env")
    monkeypatch.setenv(
        "OIDC_PROVIDERS",
        '[{"name": "google", "displayName": "Google", "issuer": "https://accounts.google.com",'
        ' "clientId": "123.apps.googleusercontent.com", "autoLinkVerifiedEmail": true},'
        ' {"name": "corp-sso", "display_name": "Corp", "issuer": "https://sso.example.com/realms/x",'
        ' "client_id": "shop", "scopes": ["openid", "email"]}]',
    )
    google, corp = UsersSettings().oidc_providers
    assert google.client_secret.get_secret_value() == "from-the-secret"
    assert google.auto_link_verified_email and google.scopes == ["openid", "email", "profile"]
    assert corp.client_secret.get_secret_value() == "from-the-env"
    assert "from-the" not in repr(google) + repr(corp)  # secrets never printed

    monkeypatch.setenv(
        "OIDC_PROVIDERS", '[{"name": "x", "displayName": "X", "issuer": "http://x", "clientId": "c"}]'
    )
    with pytest.raises(ValueError, match="not https"):
        UsersSettings(environment="production", database_url="postgresql://u:strong-pw@db:5432/users")
    for bad in ('{"scopes": ["email"]}', '{"name": "Bad Name"}', '{"issuer": "ftp://x"}', '{"extra": 1}'):
        entry = {"name": "x", "displayName": "X", "issuer": "https://x", "clientId": "c"} | json.loads(bad)
        monkeypatch.setenv("OIDC_PROVIDERS", json.dumps([entry]))
        with pytest.raises(ValueError):
            UsersSettings()
