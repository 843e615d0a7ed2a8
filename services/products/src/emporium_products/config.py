from __future__ import annotations

from emporium_common.config import InternalTokenSettings


class ProductsSettings(InternalTokenSettings):
    service_name: str = "products"
