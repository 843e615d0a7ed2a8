"""throttling: registration attempts per address; indexes for the failure counts

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "registration_attempts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("client_address", sa.String(64), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registration_attempts")),
    )
    op.create_index(
        "ix_registration_attempts_client_address_attempted_at",
        "registration_attempts",
        ["client_address", "attempted_at"],
    )
    # The failure counts filter on (address, time) and (email, time).
    op.create_index(
        "ix_login_attempts_client_address_attempted_at", "login_attempts", ["client_address", "attempted_at"]
    )
    op.create_index("ix_login_attempts_email_attempted_at", "login_attempts", ["email", "attempted_at"])


def downgrade() -> None:
    op.drop_index("ix_login_attempts_email_attempted_at", "login_attempts")
    op.drop_index("ix_login_attempts_client_address_attempted_at", "login_attempts")
    op.drop_table("registration_attempts")
