"""products.version: the row version behind ETag / If-Match (stale stock writes are refused)

Revision ID: 0002_product_version
Revises: 0001_products
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_product_version"
down_revision = "0001_products"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("products", sa.Column("version", sa.Integer, nullable=False, server_default="1"))
    # The reaper pages through stale reservations by (reserved_at, id).
    op.drop_index("ix_stock_reservations_reserved_at", table_name="stock_reservations")
    op.create_index(
        "ix_stock_reservations_reserved_at",
        "stock_reservations",
        ["reserved_at", "id"],
        postgresql_where=sa.text("status = 'reserved'"),
    )


def downgrade() -> None:
    op.drop_index("ix_stock_reservations_reserved_at", table_name="stock_reservations")
    op.create_index(
        "ix_stock_reservations_reserved_at",
        "stock_reservations",
        ["reserved_at"],
        postgresql_where=sa.text("status = 'reserved'"),
    )
    op.drop_column("products", "version")
