from __future__ import annotations

from emporium_common import Settings
from pydantic import Field, model_validator


class ProductsSettings(Settings):
    service_name: str = "products"
    # Shared secret that callers of /internal/* (the orders service) send as X-Internal-Token.
    # Unset: the internal endpoints refuse every call (403).
    internal_token: str | None = Field(default=None, min_length=16)

    @model_validator(mode="after")
    def _internal_token_in_production(self):
        if self.is_production and not self.internal_token:
            raise ValueError("refusing weak production configuration: INTERNAL_TOKEN is not set")
        return self
