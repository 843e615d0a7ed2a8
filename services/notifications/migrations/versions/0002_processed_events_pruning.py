"""processed_events.processed_at index (old event ids are pruned)

Revision ID: 0002_processed_events_pruning
Revises: 0001_notifications
Create Date: 2026-11-30
"""

from alembic import op

revision = "0002_processed_events_pruning"
down_revision = "0001_notifications"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_processed_events_processed_at", "processed_events", ["processed_at"])


def downgrade() -> None:
    op.drop_index("ix_processed_events_processed_at", table_name="processed_events")
