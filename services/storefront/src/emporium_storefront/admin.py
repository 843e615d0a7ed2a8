"""The administrators' pages: products (create, edit, deactivate, stock), orders (move them along their
states) and failed notifications (retry). The edge and the services check the admin role again."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from .upstream import ApiError
from .web import admin_token, check_csrf, expired, redirect, render, session_of, upstream_of

router = APIRouter(prefix="/admin", include_in_schema=False)

# The orders service's state machine: which moves an administrator is offered from each status.
NEXT_STATUSES = {
    "pending": ["confirmed", "cancelled"],
    "confirmed": ["shipped", "cancelled"],
    "shipped": ["delivered"],
}
PRODUCT_FIELDS = ("name", "sku", "price", "category", "description")


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _handle(request: Request, error: ApiError) -> None:
    if error.status == 401:
        raise expired(request) from error


@router.get("", response_class=HTMLResponse)
async def admin_home(request: Request) -> Response:
    await admin_token(request)
    return redirect("/admin/products")


@router.get("/products", response_class=HTMLResponse)
async def products(request: Request) -> HTMLResponse:
    await admin_token(request)
    page = max(1, _int(request.query_params.get("page"), 1))
    q = request.query_params.get("q", "").strip()[:200]
    listing = await upstream_of(request).json(
        "products",
        "GET",
        "/products",
        params={"limit": 25, "offset": (page - 1) * 25, "name": q, "sort_by": "-created_at"},
    )
    pages = max(1, math.ceil(listing["total"] / 25))
    return render(request, "admin/products.html", products=listing["items"], page=page, pages=pages, q=q)


@router.get("/products/new", response_class=HTMLResponse)
async def new_product(request: Request) -> HTMLResponse:
    await admin_token(request)
    return render(request, "admin/product_form.html", product=None, form={}, errors={})


def _product_body(form: dict[str, str], *, new: bool) -> dict[str, Any]:
    body: dict[str, Any] = {k: form.get(k, "").strip() for k in PRODUCT_FIELDS}
    body["category"] = body["category"] or None
    body["description"] = body["description"] or None
    if new:
        body["stock_quantity"] = _int(form.get("stock_quantity"), -1)
    body["is_active"] = form.get("is_active") == "on" if not new else True
    return body


@router.post("/products")
async def create_product(request: Request) -> Response:
    form = await check_csrf(request)
    token = await admin_token(request)
    body = _product_body(form, new=True)
    try:
        product = await upstream_of(request).json("products", "POST", "/products", token=token, json=body)
    except ApiError as error:
        _handle(request, error)
        errors = error.field_errors() or {"sku" if error.status == 409 else "name": error.message}
        return render(request, "admin/product_form.html", 400, product=None, form=form, errors=errors)
    request.app.state.categories = None
    session_of(request).flash(f"Product “{product['name']}” was created.", "success")
    return redirect(f"/admin/products/{product['id']}")


@router.get("/products/{product_id}", response_class=HTMLResponse)
async def edit_product(request: Request, product_id: int) -> HTMLResponse:
    await admin_token(request)
    product, etag = await _get_product_and_etag(request, product_id)
    if product is None:
        return render(request, "error.html", 404, title="Product not found", message="No such product.")
    form = {k: product.get(k) or "" for k in PRODUCT_FIELDS} | {"is_active": product["is_active"]}
    return render(request, "admin/product_form.html", product=product, form=form, errors={}, etag=etag)


async def _get_product_and_etag(request: Request, product_id: int) -> tuple[dict | None, str]:
    """The product and its ETag (the version the stock form's absolute level was chosen from)."""
    if not 1 <= product_id < 2**31:
        return None, ""
    try:
        response = await upstream_of(request).call("products", "GET", f"/products/{product_id}")
    except ApiError as error:
        if error.status in (404, 422):
            return None, ""
        raise
    return response.json(), response.headers.get("etag", "")


@router.post("/products/{product_id}")
async def update_product(request: Request, product_id: int) -> Response:
    form = await check_csrf(request)
    token = await admin_token(request)
    body = _product_body(form, new=False)
    try:
        await upstream_of(request).json(
            "products", "PATCH", f"/products/{product_id}", token=token, json=body
        )
    except ApiError as error:
        _handle(request, error)
        product, etag = await _get_product_and_etag(request, product_id)
        errors = error.field_errors() or {"sku" if error.status == 409 else "name": error.message}
        form = {**form, "is_active": form.get("is_active") == "on"}
        return render(
            request, "admin/product_form.html", 400, product=product, form=form, errors=errors, etag=etag
        )
    request.app.state.categories = None
    session_of(request).flash("The product was saved.", "success")
    return redirect(f"/admin/products/{product_id}")


@router.post("/products/{product_id}/deactivate")
async def deactivate_product(request: Request, product_id: int) -> Response:
    await check_csrf(request)
    token = await admin_token(request)
    try:
        await upstream_of(request).call("products", "DELETE", f"/products/{product_id}", token=token)
    except ApiError as error:
        _handle(request, error)
        session_of(request).flash(f"The product could not be deactivated: {error.message}.", "error")
        return redirect("/admin/products")
    request.app.state.categories = None
    session_of(request).flash("The product was deactivated: it is no longer in the shop.", "success")
    return redirect(f"/admin/products/{product_id}")


@router.post("/products/{product_id}/stock")
async def set_stock(request: Request, product_id: int) -> Response:
    form = await check_csrf(request)
    token = await admin_token(request)
    quantity = _int(form.get("stock_quantity"), -1)
    # An absolute level undoes whatever sold since the page was read: the products service takes it only
    # with If-Match, the ETag of the product as the page showed it (412 when it changed meanwhile).
    etag = form.get("etag", "")
    try:
        await upstream_of(request).json(
            "products",
            "PATCH",
            f"/products/{product_id}/stock",
            token=token,
            json={"stock_quantity": quantity},
            headers={"If-Match": etag} if etag else None,
        )
    except ApiError as error:
        _handle(request, error)
        if error.status == 422:
            message = "Stock must be a whole number, 0 or more."
        elif error.status in (412, 428):
            message = (
                "The product changed since this page was shown (an order or another administrator). "
                "Check the stock shown now and set it again."
            )
        else:
            message = error.message
        session_of(request).flash(f"The stock was not changed: {message}", "error")
        return redirect(f"/admin/products/{product_id}")
    session_of(request).flash(f"Stock set to {quantity}.", "success")
    return redirect(f"/admin/products/{product_id}")


# -- orders -------------------------------------------------------------------------------------------


@router.get("/orders", response_class=HTMLResponse)
async def orders(request: Request) -> Response:
    """The orders API lists a caller's own orders only: recent orders come from the order confirmations
    the notifications service stored (admins see all), then each order is read by id."""
    token = await admin_token(request)
    lookup = request.query_params.get("order_id", "").strip()
    if lookup:
        if lookup.lstrip("#").isdigit():
            return redirect(f"/admin/orders/{int(lookup.lstrip('#'))}")
        session_of(request).flash("An order number is a whole number, such as 42.", "error")
    upstream = upstream_of(request)
    try:
        confirmations = await upstream.json(
            "notifications",
            "GET",
            "/notifications",
            token=token,
            params={"page_size": 20},
        )
    except ApiError as error:
        _handle(request, error)
        raise
    ids = sorted({n["order_id"] for n in confirmations["notifications"] if n.get("order_id")}, reverse=True)

    async def one(order_id: int) -> dict | None:
        try:
            return await upstream.json("orders", "GET", f"/orders/{order_id}", token=token)
        except ApiError:
            return None

    recent = [o for o in await asyncio.gather(*(one(i) for i in ids[:15])) if o]
    return render(request, "admin/orders.html", orders=recent, next_statuses=NEXT_STATUSES)


@router.get("/orders/{order_id}", response_class=HTMLResponse)
async def order(request: Request, order_id: int) -> HTMLResponse:
    token = await admin_token(request)
    try:
        found = await upstream_of(request).json("orders", "GET", f"/orders/{order_id}", token=token)
    except ApiError as error:
        _handle(request, error)
        if error.status not in (404, 422):
            raise
        message = f"There is no order number {order_id}."
        return render(request, "error.html", 404, title="Order not found", message=message)
    return render(request, "admin/order.html", order=found, next_statuses=NEXT_STATUSES)


@router.post("/orders/{order_id}/status")
async def move_order(request: Request, order_id: int) -> Response:
    form = await check_csrf(request)
    token = await admin_token(request)
    status = form.get("status", "")
    try:
        if status == "cancelled":
            await upstream_of(request).call("orders", "POST", f"/orders/{order_id}/cancel", token=token)
        else:
            await upstream_of(request).call(
                "orders", "PATCH", f"/orders/{order_id}/status", token=token, json={"status": status}
            )
    except ApiError as error:
        _handle(request, error)
        session_of(request).flash(f"The order was not changed: {error.message}.", "error")
        return redirect(f"/admin/orders/{order_id}")
    session_of(request).flash(f"Order #{order_id} is now {status}.", "success")
    return redirect(f"/admin/orders/{order_id}")


# -- notifications ------------------------------------------------------------------------------------


@router.get("/notifications", response_class=HTMLResponse)
async def notifications(request: Request) -> HTMLResponse:
    token = await admin_token(request)
    status = request.query_params.get("status", "failed")
    status = status if status in ("failed", "pending", "sent", "all") else "failed"
    page = max(1, _int(request.query_params.get("page"), 1))
    try:
        listing = await upstream_of(request).json(
            "notifications",
            "GET",
            "/notifications",
            token=token,
            params={"status": None if status == "all" else status, "page": page, "page_size": 25},
        )
    except ApiError as error:
        _handle(request, error)
        raise
    pages = max(1, math.ceil(listing["total"] / 25))
    return render(
        request,
        "admin/notifications.html",
        notifications=listing["notifications"],
        total=listing["total"],
        status=status,
        page=page,
        pages=pages,
    )


@router.post("/notifications/{notification_id}/retry")
async def retry(request: Request, notification_id: int) -> Response:
    await check_csrf(request)
    token = await admin_token(request)
    try:
        result = await upstream_of(request).json(
            "notifications", "POST", f"/notifications/retry/{notification_id}", token=token
        )
    except ApiError as error:
        _handle(request, error)
        session_of(request).flash(
            f"Notification #{notification_id} was not retried: {error.message}.", "error"
        )
        return redirect("/admin/notifications")
    status = (result or {}).get("status", "retried")
    session_of(request).flash(f"Notification #{notification_id} was sent again: now {status}.", "success")
    return redirect("/admin/notifications")
