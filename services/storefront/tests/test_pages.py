from __future__ import annotations

import asyncio
import re
from html import unescape

import httpx
import pytest
from emporium_storefront.config import StorefrontSettings
from emporium_storefront.web import CSP, safe_next

from .conftest import PRODUCTS, csrf_of, make_client, sign_in


async def test_catalog_passes_search_filter_sort_and_page_to_the_products_api(client, shop):
    response = await client.get("/", params={"q": "mug", "category": "kitchen", "sort": "-price", "page": 3})
    assert response.status_code == 200
    assert "Product 1" in response.text and "Page 3 of 3" in response.text
    listing = next(c for c in shop.calls if c.url.path == "/products" and c.url.params.get("name") == "mug")
    params = dict(listing.url.params)
    assert params == {
        "name": "mug",
        "category": "kitchen",
        "sort_by": "-price",
        "limit": "12",
        "offset": "24",
        "is_active": "true",
    }


async def test_templates_escape_what_the_services_return(client, shop):
    PRODUCTS[0]["name"] = '<script>alert("x")</script>'
    try:
        html = (await client.get("/")).text
    finally:
        PRODUCTS[0]["name"] = "Product 1"
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html


async def test_security_headers_and_session_cookie(client):
    response = await client.get("/")
    assert response.headers["content-security-policy"] == CSP
    assert "unsafe-inline" not in CSP and "script-src 'self'" in CSP
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("emporium_session=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # local mode: plain http://127.0.0.1
    assert "<script>" not in response.text.replace('<script src="/static/shop.js" defer></script>', "")


async def test_cookies_are_secure_outside_local_mode(shop):
    async with make_client(shop, environment="development") as client:
        response = await client.get("https://shop.test/")
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("__Host-emporium_session=") and "; Secure" in cookie
        assert "Strict-Transport-Security" in response.headers


def test_production_needs_a_session_key():
    with pytest.raises(ValueError, match="SESSION_KEY"):
        StorefrontSettings(environment="production")
    assert StorefrontSettings(environment="production", session_key="k" * 32).secure_cookies


async def test_tokens_are_sealed_in_the_cookie(client, shop):
    await sign_in(client)
    cookie = client.cookies["emporium_session"]
    assert shop.issued and not any(part in cookie for t in shop.issued for part in t.split("."))
    client.cookies.set("emporium_session", cookie[:-4] + "AAAA")  # tampered: a fresh, signed-out session
    response = await client.get("/account/orders")
    assert response.status_code == 303 and response.headers["location"] == "/login?next=/account/orders"


@pytest.mark.parametrize("path", ["/cart/add", "/checkout", "/logout", "/login", "/admin/products"])
async def test_every_form_needs_the_csrf_token(client, path):
    await client.get("/")
    response = await client.post(path, data={"product_id": "1", "quantity": "1"})
    assert response.status_code == 403 and "This form has expired" in response.text


async def test_a_form_from_another_origin_is_refused(client):
    token = csrf_of((await client.get("/product/1")).text)
    response = await client.post(
        "/cart/add",
        data={"csrf_token": token, "product_id": "1", "quantity": "1"},
        headers={"Origin": "http://evil.test"},
    )
    assert response.status_code == 403


@pytest.mark.filterwarnings("ignore:Setting per-request cookies")
async def test_double_checkout_makes_one_order(client, shop):
    await sign_in(client)
    token = csrf_of((await client.get("/product/1")).text)
    await client.post("/cart/add", data={"csrf_token": token, "product_id": "1", "quantity": "2"})
    cart = (await client.get("/cart")).text
    key = re.search(r'name="idempotency_key" value="([^"]+)"', cart)[1]
    form = {"csrf_token": csrf_of(cart), "idempotency_key": key}
    cookies = dict(client.cookies)
    first, second = await asyncio.gather(
        client.post("/checkout", data=form, cookies=cookies),
        client.post("/checkout", data=form, cookies=cookies),
    )
    assert first.headers["location"] == second.headers["location"] == "/account/orders/1"
    posts = [c for c in shop.calls if c.url.path == "/orders" and c.method == "POST"]
    assert len(posts) == 2 and {c.headers["Idempotency-Key"] for c in posts} == {key}
    assert len(shop.orders) == 1
    assert posts[0].headers["Authorization"].startswith("Bearer ey")


async def test_stock_is_checked_when_adding_to_the_cart(client):
    token = csrf_of((await client.get("/product/3")).text)
    response = await client.post("/cart/add", data={"csrf_token": token, "product_id": "3", "quantity": "9"})
    assert response.headers["location"] == "/product/3"
    page = await client.get("/product/3")
    assert "Only 5 of “Product 3” left in stock." in page.text


@pytest.mark.filterwarnings("ignore:Setting per-request cookies")
async def test_concurrent_pages_refresh_the_token_once(shop):
    shop.access_ttl = 30  # expires within the refresh margin
    async with make_client(shop) as client:
        await sign_in(client)
        cookies = dict(client.cookies)
        responses = await asyncio.gather(*(client.get("/account/orders", cookies=cookies) for _ in range(4)))
        assert all(r.status_code == 200 for r in responses)
        assert shop.refreshes == 1  # a refresh token is single-use: never spent twice


async def test_an_unreachable_service_is_a_page_not_a_stack_trace(shop):
    shop.down.add("products")
    async with make_client(shop) as client:
        response = await client.get("/")
        assert response.status_code == 503
        assert "catalog service is not answering" in response.text
        assert "Traceback" not in response.text and "httpx" not in response.text


async def test_unknown_pages_and_bad_ids_are_404_pages(client):
    for path in ("/nothing-here", "/product/abc", "/product/999"):
        response = await client.get(path)
        assert response.status_code == 404 and "<html" in response.text, path


async def test_admin_pages_are_for_admins(client):
    await sign_in(client)
    response = await client.get("/admin/products")
    assert response.status_code == 403 and "For administrators only" in response.text


def test_only_local_redirects():
    assert safe_next("/cart") == "/cart"
    for evil in ("//evil.test", "https://evil.test", "/\\evil.test", "", None):
        assert safe_next(evil) == "/"


# -- sign in with an OpenID Connect provider -----------------------------------------------------------

PROVIDER = {"name": "corp", "display_name": "Corp ID", "start_url": "/auth/oidc/corp/start"}


async def start_provider_sign_in(client, next_url: str = "/cart") -> str:
    """The provider's button -> the users service's start URL; returns the return_to it carries."""
    response = await client.get("/login/with/corp", params={"next": next_url})
    assert response.status_code == 303, response.text
    location = httpx.URL(response.headers["location"])
    assert location.path == "/auth/oidc/corp/start"
    return location.params["return_to"]


async def test_a_button_per_provider_of_the_users_service(client, shop):
    shop.providers = [PROVIDER, {**PROVIDER, "name": "google", "display_name": "Google"}]
    html = (await client.get("/login", params={"next": "/cart"})).text
    assert 'id="sign-in-with-corp" href="/login/with/corp?next=/cart">Sign in with Corp ID</a>' in html
    assert ">Sign in with Google</a>" in html
    unknown = await client.get("/login/with/other")
    assert unknown.status_code == 404 and "does not exist" in unknown.text


async def test_no_providers_no_buttons(client, shop):
    assert "Or sign in with" not in (await client.get("/login")).text


async def test_the_callback_signs_in_with_the_one_time_code(client, shop):
    shop.providers = [PROVIDER]
    return_to = await start_provider_sign_in(client)
    assert return_to.startswith("/login/oidc?s=") and "next=%2Fcart" in return_to
    shop.login_codes.add("code-1")
    response = await client.get(return_to + "&login_code=code-1")
    assert response.status_code == 303 and response.headers["location"] == "/cart"  # a clean URL
    page = await client.get("/cart")
    assert "Welcome, ann!" in page.text and 'Sign out <span class="muted">(ann)' in page.text
    cookie = client.cookies["emporium_session"]
    assert not any(part in cookie for t in shop.issued for part in t.split("."))  # sealed
    again = await client.get(return_to + "&login_code=code-1")  # the same callback URL: spent
    assert again.headers["location"] == "/login?next=%2Fcart"


async def test_a_callback_not_started_in_this_browser_is_refused(client, shop):
    """Login CSRF: a callback URL someone else started (their code) does not sign this browser in."""
    shop.providers = [PROVIDER]
    return_to = await start_provider_sign_in(client)
    shop.login_codes.add("attackers-code")
    forged = return_to.replace("s=", "s=x", 1) + "&login_code=attackers-code"
    response = await client.get(forged)
    assert response.status_code == 303 and response.headers["location"].startswith("/login?")
    page = await client.get(response.headers["location"])
    assert "not valid here" in page.text and "Sign out" not in page.text
    assert "attackers-code" in shop.login_codes  # never exchanged


async def test_a_refusal_of_the_users_service_is_a_message(client, shop):
    shop.providers = [PROVIDER]
    return_to = await start_provider_sign_in(client)
    response = await client.get(return_to + "&login_error=oidc_email_not_verified")
    page = await client.get(response.headers["location"])
    assert "has not verified your email address" in page.text and "Sign out" not in page.text
    return_to = await start_provider_sign_in(client)
    response = await client.get(return_to + "&login_code=unknown")
    page = await client.get(response.headers["location"])
    assert "did not finish" in page.text and "Sign out" not in page.text


async def test_the_product_form_has_real_validation_attributes(client, shop):
    """The browser's own checks: attributes, not an escaped string of them (a price like 34.90 must pass)."""
    shop.roles = ("admin",)
    await sign_in(client)
    html = (await client.get("/admin/products/new")).text
    price = re.search(r'<input id="price"[^>]*>', html)[0]
    assert 'pattern="[0-9]+([.][0-9]{1,2})?"' in price and 'required="required"' in price, price
    assert "&#34;" not in html
    pattern = re.search(r'pattern="([^"]+)"', price)[1]
    assert (
        re.fullmatch(pattern, "34.90") and re.fullmatch(pattern, "12") and not re.fullmatch(pattern, "1.234")
    )
    assert 'minlength="3"' in re.search(r'<input id="name"[^>]*>', html)[0]


async def test_setting_the_stock_sends_the_etag_the_page_was_shown_with(client, shop):
    """An absolute stock level needs If-Match: a sale since the page was read makes it a 412, not a silent
    undo of the sale."""
    shop.roles = ("admin",)
    await sign_in(client)
    html = (await client.get("/admin/products/3")).text
    token, etag = csrf_of(html), unescape(re.search(r'name="etag" value="([^"]+)"', html)[1])
    assert etag == '"3-0"'  # as the browser sends it back
    form = {"csrf_token": token, "etag": etag, "stock_quantity": "9"}
    response = await client.post("/admin/products/3/stock", data=form)
    assert response.status_code == 303 and shop.stock_writes == [9]
    assert "Stock set to 9." in (await client.get("/admin/products/3")).text
    shop.versions[3] = 1  # an order reserved some meanwhile
    await client.post("/admin/products/3/stock", data={**form, "stock_quantity": "4"})
    page = (await client.get("/admin/products/3")).text
    assert "The product changed since this page was shown" in page and shop.stock_writes == [9]
