"""The customer's pages: catalog, product, cart, checkout, orders, notifications, sign-in and register."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import re
import secrets
import time
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from .upstream import ApiError, Unavailable
from .web import (
    check_csrf,
    expired,
    fresh_token,
    redirect,
    render,
    safe_next,
    session_of,
    upstream_of,
    user_from_token,
)

router = APIRouter(include_in_schema=False)

SORTS = {
    "newest": ("-created_at", "Newest"),
    "price": ("price", "Price: low to high"),
    "-price": ("-price", "Price: high to low"),
    "name": ("name", "Name: A to Z"),
}
CATEGORY_TTL_SECONDS = 60.0
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")  # the users service's pattern
PROVIDERS_TTL_SECONDS = 60.0


def _int(value: Any, default: int, low: int, high: int) -> int:
    try:
        return min(max(int(value), low), high)
    except (TypeError, ValueError):
        return default


async def categories(request: Request) -> list[str]:
    """The catalog's categories (the API has no list of them): from the active products, cached a minute."""
    state = request.app.state
    cached = getattr(state, "categories", None)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    try:
        page = await upstream_of(request).json(
            "products", "GET", "/products", params={"limit": 100, "is_active": "true", "sort_by": "name"}
        )
        names = sorted({p["category"] for p in page["items"] if p.get("category")})
    except (ApiError, Unavailable):
        names = cached[1] if cached else []
    state.categories = (time.monotonic() + CATEGORY_TTL_SECONDS, names)
    return names


@router.get("/", response_class=HTMLResponse)
async def catalog(request: Request) -> HTMLResponse:
    await fresh_token(request, required=False)  # silent refresh for signed-in visitors
    params = request.query_params
    q = params.get("q", "").strip()[:200]
    category = params.get("category", "").strip()[:100]
    sort = params.get("sort", "newest")
    sort = sort if sort in SORTS else "newest"
    page = _int(params.get("page"), 1, 1, 10_000)
    size = request.app.state.settings.page_size
    listing, names = await asyncio.gather(
        upstream_of(request).json(
            "products",
            "GET",
            "/products",
            params={
                "name": q,
                "category": category,
                "sort_by": SORTS[sort][0],
                "limit": size,
                "offset": (page - 1) * size,
                "is_active": "true",
            },
        ),
        categories(request),
    )
    pages = max(1, math.ceil(listing["total"] / size))
    return render(
        request,
        "catalog.html",
        products=listing["items"],
        total=listing["total"],
        q=q,
        category=category,
        categories=names,
        sort=sort,
        sorts=SORTS,
        page=page,
        pages=pages,
    )


@router.get("/product/{product_id}", response_class=HTMLResponse)
async def product_page(request: Request, product_id: int) -> HTMLResponse:
    await fresh_token(request, required=False)
    product = await _product(request, product_id)
    if product is None or not product.get("is_active", True):
        return render(request, "error.html", 404, title="Product not found", message=_gone(product_id))
    in_cart = session_of(request).cart.get(str(product_id), 0)
    return render(request, "product.html", product=product, in_cart=in_cart)


def _gone(product_id: int) -> str:
    return f"There is no product number {product_id} in the shop (any more). Have a look at the catalog."


async def _product(request: Request, product_id: int) -> dict | None:
    if not 1 <= product_id < 2**31:
        return None
    try:
        return await upstream_of(request).json("products", "GET", f"/products/{product_id}")
    except ApiError as error:
        if error.status in (404, 422):
            return None
        raise


# -- cart ---------------------------------------------------------------------------------------------


@router.post("/cart/add")
async def cart_add(request: Request) -> Response:
    form = await check_csrf(request)
    session = session_of(request)
    product_id = _int(form.get("product_id"), 0, 0, 2**31 - 1)
    quantity = _int(form.get("quantity"), 1, 1, 1000)
    product = await _product(request, product_id)
    if product is None or not product.get("is_active", True):
        session.flash("That product is no longer available.", "error")
        return redirect("/cart")
    cart = dict(session.cart)
    wanted = cart.get(str(product_id), 0) + quantity
    if wanted > product["stock_quantity"]:
        left = product["stock_quantity"]
        session.flash(
            f"Only {left} of “{product['name']}” left in stock."
            if left
            else f"“{product['name']}” is out of stock.",
            "error",
        )
        return redirect(f"/product/{product_id}")
    cart[str(product_id)] = wanted
    session.set_cart(cart)
    session.flash(f"Added {quantity} of “{product['name']}” to your cart.", "success")
    return redirect(safe_next(form.get("next"), "/cart"))


@router.post("/cart/update")
async def cart_update(request: Request) -> Response:
    form = await check_csrf(request)
    session = session_of(request)
    product_id = str(_int(form.get("product_id"), 0, 0, 2**31 - 1))
    quantity = _int(form.get("quantity"), 0, 0, 1000)
    cart = dict(session.cart)
    if product_id in cart:
        if quantity:
            cart[product_id] = quantity
        else:
            cart.pop(product_id)
        session.set_cart(cart)
        session.flash("Your cart was updated." if quantity else "The item was removed.", "success")
    return redirect("/cart")


async def _cart_lines(request: Request) -> tuple[list[dict], str]:
    cart = session_of(request).cart
    products = await asyncio.gather(*(_product(request, int(pid)) for pid in cart))
    lines, total = [], 0.0
    for (pid, quantity), product in zip(cart.items(), products, strict=True):
        if product is None:
            continue
        subtotal = float(product["price"]) * quantity
        total += subtotal
        lines.append({"product": product, "quantity": quantity, "subtotal": f"{subtotal:.2f}", "id": pid})
    return lines, f"{total:.2f}"


@router.get("/cart", response_class=HTMLResponse)
async def cart_page(request: Request) -> HTMLResponse:
    await fresh_token(request, required=False)
    lines, total = await _cart_lines(request)
    session = session_of(request)
    return render(request, "cart.html", lines=lines, total=total, checkout_key=session.checkout_key)


@router.post("/checkout")
async def checkout(request: Request) -> Response:
    """Places the order with the cart's Idempotency-Key: a double click or a retry of the same cart sends
    the same key, so the orders service returns the one order instead of making a second."""
    form = await check_csrf(request)
    session = session_of(request)
    if not session.get("access_token"):
        session.flash("Please sign in to place your order. Your cart is kept.", "info")
        return redirect("/login?next=/cart")
    token = await fresh_token(request)
    key = form.get("idempotency_key", "")
    if not KEY_PATTERN.match(key):
        session.flash("The checkout form was incomplete. Please try again.", "error")
        return redirect("/cart")
    cart = session.cart
    last = session.get("last_order") or {}
    if not cart and last.get("key") == key:
        # the second click of a double click, after the first one's answer: the same order
        return redirect(f"/account/orders/{last['id']}")
    if not cart:
        session.flash("Your cart is empty.", "info")
        return redirect("/cart")
    items = [{"product_id": int(pid), "quantity": q} for pid, q in cart.items()]
    try:
        order = await upstream_of(request).json(
            "orders",
            "POST",
            "/orders",
            token=token,
            json={"items": items},
            headers={"Idempotency-Key": key},
        )
    except ApiError as error:
        if error.status == 401:
            raise expired(request) from error
        if error.status == 422 and key != session.checkout_key:
            # the cart changed since this form was shown: the key now belongs to another cart
            session.flash("Your cart changed in another tab. Please check it and place the order again.")
        else:
            session.flash(_order_problem(error), "error")
        return redirect("/cart")
    if key == session.get("checkout_key"):
        session.set_cart({})
    session["last_order"] = {"key": key, "id": order["id"]}
    session.flash(f"Thank you! Order #{order['id']} was placed.", "success")
    return redirect(f"/account/orders/{order['id']}")


def _order_problem(error: ApiError) -> str:
    if error.status == 400:
        return f"We could not place your order: {error.message}. Please change the quantity in your cart."
    if error.status == 404:
        return f"We could not place your order: {error.message}. Please remove it from your cart."
    return f"We could not place your order: {error.message}."


# -- orders and notifications ------------------------------------------------------------------------


@router.get("/account/orders", response_class=HTMLResponse)
async def orders_page(request: Request) -> HTMLResponse:
    token = await fresh_token(request)
    try:
        orders = await upstream_of(request).json(
            "orders", "GET", "/orders", token=token, params={"limit": 50}
        )
    except ApiError as error:
        if error.status == 401:
            raise expired(request) from error
        raise
    return render(request, "orders.html", orders=orders)


async def _order(request: Request, token: str, order_id: int) -> dict | None:
    if not 1 <= order_id < 2**31:
        return None
    try:
        return await upstream_of(request).json("orders", "GET", f"/orders/{order_id}", token=token)
    except ApiError as error:
        if error.status == 401:
            raise expired(request) from error
        if error.status in (404, 422):
            return None
        raise


@router.get("/account/orders/{order_id}", response_class=HTMLResponse)
async def order_page(request: Request, order_id: int) -> HTMLResponse:
    token = await fresh_token(request)
    order = await _order(request, token, order_id)  # type: ignore[arg-type]
    if order is None:
        message = f"You have no order number {order_id}. Your orders are listed under “Orders”."
        return render(request, "error.html", 404, title="Order not found", message=message)
    return render(request, "order.html", order=order)


@router.post("/account/orders/{order_id}/cancel")
async def cancel_order(request: Request, order_id: int) -> Response:
    await check_csrf(request)
    token = await fresh_token(request)
    session = session_of(request)
    try:
        await upstream_of(request).call("orders", "POST", f"/orders/{order_id}/cancel", token=token)
    except ApiError as error:
        if error.status == 401:
            raise expired(request) from error
        session.flash(f"The order could not be cancelled: {error.message}.", "error")
        return redirect(f"/account/orders/{order_id}")
    session.flash(f"Order #{order_id} was cancelled.", "success")
    return redirect(f"/account/orders/{order_id}")


@router.get("/account/notifications", response_class=HTMLResponse)
async def notifications_page(request: Request) -> HTMLResponse:
    token = await fresh_token(request)
    page = _int(request.query_params.get("page"), 1, 1, 10_000)
    try:
        listing = await upstream_of(request).json(
            "notifications", "GET", "/notifications", token=token, params={"page": page, "page_size": 20}
        )
    except ApiError as error:
        if error.status == 401:
            raise expired(request) from error
        raise
    pages = max(1, math.ceil(listing["total"] / 20))
    return render(
        request, "notifications.html", notifications=listing["notifications"], page=page, pages=pages
    )


@router.get("/session")
async def session_check(request: Request) -> Response:
    """For the page's script: 204 with a refreshed session cookie, 401 when signed out."""
    token = await fresh_token(request, required=False)
    return Response(status_code=204 if token else 401)


# -- sign in, register, sign out ---------------------------------------------------------------------


async def sign_in_providers(request: Request) -> list[dict[str, str]]:
    """The users service's OpenID Connect providers (one button each), cached a minute."""
    state = request.app.state
    cached = getattr(state, "sign_in_providers", None)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    try:
        listed = await upstream_of(request).json("users", "GET", "/auth/oidc/providers")
        providers = [
            {"name": p["name"], "display_name": p["display_name"]}
            for p in listed
            if PROVIDER_NAME.match(str(p.get("name", ""))) and p.get("display_name")
        ]
    except (ApiError, Unavailable, KeyError, TypeError):
        providers = cached[1] if cached else []
    state.sign_in_providers = (time.monotonic() + PROVIDERS_TTL_SECONDS, providers)
    return providers


async def _login_page(request: Request, status_code: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("email", "")
    return render(request, "login.html", status_code, providers=await sign_in_providers(request), **context)


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> HTMLResponse:
    return await _login_page(request, next=safe_next(request.query_params.get("next")))


@router.get("/login/with/{provider}")
async def login_with(request: Request, provider: str) -> Response:
    """A "Sign in with <provider>" button: the users service runs the OpenID Connect flow (same origin,
    through the ingress: /auth/oidc/) and sends the browser back to /login/oidc with a one-time login code."""
    next_url = safe_next(request.query_params.get("next"))
    if provider not in {p["name"] for p in await sign_in_providers(request)}:
        error = "That sign-in option does not exist (any more). Please choose another one."
        return await _login_page(request, 404, next=next_url, error=error)
    # Binds the code that comes back to this browser's session: a sign-in link someone else started (login
    # CSRF: signing the victim in to the attacker's account) does not match it.
    pending = secrets.token_urlsafe(24)
    session = session_of(request)
    session["oidc_pending"] = pending
    session.mark()
    back = "/login/oidc?" + urlencode({"s": pending, "next": next_url})
    return redirect(f"/auth/oidc/{provider}/start?" + urlencode({"return_to": back}))


OIDC_ERRORS = {
    "oidc_link_required": (
        "An account with this email address already exists. Sign in with your password; you can link the "
        "provider to it afterwards."
    ),
    "oidc_email_not_verified": (
        "The provider has not verified your email address, so it cannot sign you in to an existing account."
    ),
    "oidc_email_missing": "The provider did not share your email address, which the shop needs.",
    "oidc_provider_error": "Signing in was cancelled at the provider.",
    "oidc_identity_in_use": "This provider account is already linked to another account.",
    "forbidden": "This account is disabled.",
}


@router.get("/login/oidc")
async def login_oidc(request: Request) -> Response:
    """Where the users service sends the browser after the provider: the one-time login code becomes the
    session (tokens sealed in the HttpOnly cookie), then a redirect to a clean URL. A refusal: the sign-in
    page with a message."""
    query = request.query_params
    session = session_of(request)
    next_url = safe_next(query.get("next"))
    pending = session.pop("oidc_pending", None)  # one use
    session.mark()
    sent = query.get("s", "")
    if not isinstance(pending, str) or not hmac.compare_digest(sent.encode(), pending.encode()):
        return _refused(session, "That sign-in link is not valid here. Please sign in again.", next_url)
    if code := query.get("login_error"):
        error = OIDC_ERRORS.get(code, "Signing in with the provider did not work. Please try again.")
        return _refused(session, error, next_url)
    upstream = upstream_of(request)
    try:
        tokens = await upstream.json(
            "users", "POST", "/auth/oidc/token", json={"code": query.get("login_code", "")[:256]}
        )
        profile = await upstream.json("users", "GET", "/users/me", token=tokens["access_token"])
    except ApiError:
        return _refused(session, "Signing in with the provider did not finish. Please try again.", next_url)
    session.sign_in(tokens, user_from_token(tokens["access_token"], profile))
    session.flash(f"Welcome, {session.user['username']}!", "success")
    return redirect(next_url)


def _refused(session: Any, message: str, next_url: str) -> Response:
    session.flash(message, "error")
    return redirect("/login?" + urlencode({"next": next_url}))


async def _sign_in(request: Request, email: str, password: str) -> None:
    upstream = upstream_of(request)
    headers = {}
    if forwarded := request.headers.get("x-forwarded-for"):
        headers["X-Forwarded-For"] = forwarded  # the login throttle keys on the shopper, not on us
    tokens = await upstream.json(
        "users", "POST", "/users/login", json={"email": email, "password": password}, headers=headers
    )
    profile = await upstream.json("users", "GET", "/users/me", token=tokens["access_token"])
    session_of(request).sign_in(tokens, user_from_token(tokens["access_token"], profile))


@router.post("/login")
async def login(request: Request) -> Response:
    form = await check_csrf(request)
    email, password = form.get("email", "").strip(), form.get("password", "")
    next_url = safe_next(form.get("next"))
    try:
        await _sign_in(request, email, password)
    except ApiError as error:
        if error.status == 429:
            message = "Too many sign-in attempts. Please wait a few minutes and try again."
        elif error.status == 422:
            message = "Please enter a valid email address and your password."
        else:
            message = "The email or password is not right. Please try again."
        return await _login_page(request, 400, next=next_url, email=email, error=message)
    session_of(request).flash(f"Welcome back, {session_of(request).user['username']}!", "success")
    return redirect(next_url)


@router.get("/register", response_class=HTMLResponse)
async def register_page(request: Request) -> HTMLResponse:
    return render(
        request, "register.html", form={}, errors={}, next=safe_next(request.query_params.get("next"))
    )


@router.post("/register")
async def register(request: Request) -> Response:
    form = await check_csrf(request)
    values = {k: form.get(k, "").strip() for k in ("email", "username")}
    password = form.get("password", "")
    next_url = safe_next(form.get("next"))
    errors: dict[str, str] = {}
    if password != form.get("password_confirm", ""):
        errors["password_confirm"] = "The two passwords are not the same."  # noqa: S105 (a message)
    if not errors:
        try:
            await upstream_of(request).json(
                "users", "POST", "/users/register", json={**values, "password": password}
            )
            await _sign_in(request, values["email"], password)
        except ApiError as error:
            if error.status == 422:
                errors = error.field_errors() or {"email": error.message}
            elif error.status == 409:
                errors = {"email": "That email or username is already registered. Sign in instead?"}
            else:
                errors = {"email": error.message}
    if errors:
        return render(request, "register.html", 400, form=values, errors=errors, next=next_url)
    session_of(request).flash(f"Welcome to Emporium, {values['username']}! Your account is ready.", "success")
    return redirect(next_url)


@router.post("/logout")
async def logout(request: Request) -> Response:
    await check_csrf(request)
    session = session_of(request)
    refresh = session.get("refresh_token")
    if refresh:
        # revokes the refresh token's family: the tokens die with the session
        with contextlib.suppress(ApiError, Unavailable):
            await upstream_of(request).call("users", "POST", "/users/logout", json={"refresh_token": refresh})
    session.sign_out()
    session.flash("You are signed out.", "info")
    return redirect("/")
