"""orders.stock_released_at (a cancel releases stock after its commit, retried until products confirms)
and reaper_cursors (the reservation reaper's position survives restarts)

Revision ID: 0002_release_tracking
Revises: 0001_orders
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op
from emporium_common.outbox import add_outbox_parking, drop_outbox_parking

revision = "0002_release_tracking"
down_revision = "0001_orders"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("orders", sa.Column("stock_released_at", sa.DateTime(timezone=True)))
    op.create_index(
        "ix_orders_release_pending",
        "orders",
        ["id"],
        postgresql_where=sa.text("status = 'cancelled' AND stock_released_at IS NULL"),
    )
    op.create_table(
        "reaper_cursors",
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("reserved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reservation_id", sa.String(100), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("name", name="pk_reaper_cursors"),
    )
    # Orders cancelled before this migration released their stock before committing: nothing pending.
    op.execute("UPDATE orders SET stock_released_at = updated_at WHERE status = 'cancelled'")
    add_outbox_parking(op)


def downgrade() -> None:
    drop_outbox_parking(op)
    op.drop_table("reaper_cursors")
    op.drop_index("ix_orders_release_pending", table_name="orders")
    op.drop_column("orders", "stock_released_at")
