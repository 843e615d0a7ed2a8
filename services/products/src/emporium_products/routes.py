"""Public catalogue API (reads public, writes need the admin role) and the internal stock API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from emporium_common import AppError, ErrorResponse, SessionDep, require_role
from emporium_common.domain import MAX_INT
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, status

from . import crud
from .internal_auth import require_internal_token
from .models import (
    Product,
    ProductCreate,
    ProductList,
    ProductPublic,
    ProductUpdate,
    ReservationPublic,
    ReservationRequest,
    ReservationSummary,
    SortBy,
    StockUpdate,
)

ProductId = Annotated[int, Path(ge=1, le=MAX_INT)]
NO_NUL = r"^[^\x00]*$"

router = APIRouter(prefix="/products", tags=["products"])
admin_only = [Depends(require_role("admin"))]
WRITE_ERRORS = {
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    409: {"model": ErrorResponse},
    412: {"model": ErrorResponse, "description": "If-Match names an older version of the product"},
    428: {"model": ErrorResponse, "description": "An absolute stock level was sent without If-Match"},
}
IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        max_length=1000,
        description="The ETag of GET /products/{id}: the write is refused with 412 if the product changed",
    ),
]


def _with_etag(response: Response, product: Product) -> Product:
    response.headers["ETag"] = crud.etag(product)
    return product


@router.get("", response_model=ProductList)
async def list_products(
    request: Request,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    category: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
    is_active: bool | None = None,
    name: Annotated[
        str | None, Query(max_length=200, pattern=NO_NUL, description="Substring, case-insensitive")
    ] = None,
    sort_by: SortBy = SortBy.created_at_desc,
) -> ProductList:
    """One query per page, serialised once by pydantic-core (no second validation pass), and kept in the
    catalogue cache until a product changes (see catalog_cache.py)."""
    cache = request.app.state.catalog_cache
    key = (limit, offset, category, is_active, name, sort_by)
    body = cache.get(key)
    if body is None:
        generation = cache.generation
        items, total = await crud.list_products(
            session,
            limit=limit,
            offset=offset,
            category=category,
            is_active=is_active,
            name=name,
            sort_by=sort_by,
        )
        page = ProductList.model_validate({"items": items, "total": total, "limit": limit, "offset": offset})
        body = page.__pydantic_serializer__.to_json(page)
        cache.put(key, generation, body)
    return Response(body, media_type="application/json")  # type: ignore[return-value]


@router.get("/{product_id}", response_model=ProductPublic, responses={404: {"model": ErrorResponse}})
async def get_product(product_id: ProductId, session: SessionDep, response: Response) -> Product:
    """The product, with its ``ETag`` (send it back as ``If-Match`` on writes)."""
    return _with_etag(response, await crud.get_product(session, product_id))


@router.post(
    "",
    response_model=ProductPublic,
    status_code=status.HTTP_201_CREATED,
    dependencies=admin_only,
    responses=WRITE_ERRORS,
)
async def create_product(body: ProductCreate, session: SessionDep, response: Response) -> Product:
    if await crud.sku_taken(session, body.sku):
        raise_conflict()
    data = body.model_dump()
    data["is_active"] = True if body.is_active is None else body.is_active
    return _with_etag(response, await crud.save_product(session, Product(**data, version=0)))


@router.put("/{product_id}", response_model=ProductPublic, dependencies=admin_only, responses=WRITE_ERRORS)
async def replace_product(
    product_id: ProductId,
    body: ProductCreate,
    session: SessionDep,
    response: Response,
    if_match: IfMatch = None,
) -> Product:
    """Full replace. It sets an absolute stock level, so it needs ``If-Match`` (428 without, 412 if stale)."""
    product = await crud.get_product(session, product_id, lock=True)
    crud.check_if_match(product, if_match, required=True)
    if await crud.sku_taken(session, body.sku, exclude_id=product_id):
        raise_conflict()
    data = body.model_dump()
    if data["is_active"] is None:  # a PUT without is_active keeps it (the older API silently reactivated)
        data.pop("is_active")
    for key, value in data.items():
        setattr(product, key, value)
    return _with_etag(response, await crud.save_product(session, product))


@router.patch("/{product_id}", response_model=ProductPublic, dependencies=admin_only, responses=WRITE_ERRORS)
async def update_product(
    product_id: ProductId,
    body: ProductUpdate,
    session: SessionDep,
    response: Response,
    if_match: IfMatch = None,
) -> Product:
    """Apply the fields sent; ``stock_quantity`` among them needs ``If-Match`` (428 without, 412 if stale)."""
    product = await crud.get_product(session, product_id, lock=True)
    data = body.model_dump(exclude_unset=True)
    crud.check_if_match(product, if_match, required="stock_quantity" in data)
    if "sku" in data and await crud.sku_taken(session, data["sku"], exclude_id=product_id):
        raise_conflict()
    for key, value in data.items():
        setattr(product, key, value)
    return _with_etag(response, await crud.save_product(session, product))


@router.delete(
    "/{product_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=admin_only, responses=WRITE_ERRORS
)
async def delete_product(product_id: ProductId, session: SessionDep, if_match: IfMatch = None) -> Response:
    """Soft delete: the product stays readable but inactive (it can no longer be ordered)."""
    product = await crud.get_product(session, product_id, lock=True)
    crud.check_if_match(product, if_match, required=False)
    product.is_active = False
    await crud.save_product(session, product)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.patch(
    "/{product_id}/stock", response_model=ProductPublic, dependencies=admin_only, responses=WRITE_ERRORS
)
async def change_stock(
    product_id: ProductId,
    body: StockUpdate,
    session: SessionDep,
    response: Response,
    if_match: IfMatch = None,
) -> Product:
    """``{"delta": n}`` adds n (negative removes; 409 below zero) atomically, without undoing reservations.
    ``{"stock_quantity": n}`` sets an absolute level: it needs ``If-Match`` with the product's ETag (428
    without, 412 when a reservation or another write changed the product since it was read)."""
    if body.delta is not None:
        if if_match is not None:
            crud.check_if_match(
                await crud.get_product(session, product_id, lock=True), if_match, required=False
            )
        return _with_etag(response, await crud.add_stock(session, product_id, body.delta))
    product = await crud.get_product(session, product_id, lock=True)
    crud.check_if_match(product, if_match, required=True)
    product.stock_quantity = body.stock_quantity  # type: ignore[assignment]
    return _with_etag(response, await crud.save_product(session, product))


def raise_conflict() -> None:
    raise AppError(409, "SKU already exists")


internal_router = APIRouter(
    prefix="/internal/stock",
    tags=["internal"],
    dependencies=[Depends(require_internal_token)],
    responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)


@internal_router.post("/reservations", response_model=ReservationPublic, status_code=status.HTTP_201_CREATED)
async def reserve(body: ReservationRequest, session: SessionDep, response: Response) -> dict:
    """Reserve all lines atomically (one call per order); 200 with the same body when replayed."""
    reservation, created = await crud.reserve_stock(session, body.reservation_id, body.lines)
    if not created:
        response.status_code = status.HTTP_200_OK
    return crud.reservation_public(reservation)


@internal_router.post("/reservations/{reservation_id}/release", response_model=ReservationPublic)
async def release(
    reservation_id: Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")],
    session: SessionDep,
) -> dict:
    """Return a reservation's stock (idempotent)."""
    return crud.reservation_public(await crud.release_stock(session, reservation_id))


@internal_router.get("/reservations", response_model=list[ReservationSummary])
async def list_stale_reservations(
    session: SessionDep,
    older_than_seconds: Annotated[int, Query(ge=0, le=30 * 24 * 3600)] = 300,
    after: Annotated[
        datetime | None, Query(description="Cursor: only reservations made after this time")
    ] = None,
    after_id: Annotated[
        str | None, Query(max_length=100, pattern=r"^[A-Za-z0-9._:-]+$", description="Cursor tie-breaker")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[ReservationSummary]:
    """Reservations still holding stock after ``older_than_seconds`` (the orders reaper releases those
    that never became an order)."""
    if after is not None and after.tzinfo is None:
        after = after.replace(tzinfo=UTC)
    return [
        ReservationSummary(reservation_id=r.id, status=r.status, reserved_at=r.reserved_at)  # type: ignore[arg-type]
        for r in await crud.stale_reservations(session, older_than_seconds, after, limit, after_id)
    ]
