from __future__ import annotations

from emporium_common.config import InternalTokenSettings
from pydantic import Field


class ProductsSettings(InternalTokenSettings):
    service_name: str = "products"
    # Catalogue pages (GET /products bodies) kept in memory until a product changes; 0 turns the cache off.
    catalog_cache_pages: int = Field(default=1024, ge=0, le=100_000)
