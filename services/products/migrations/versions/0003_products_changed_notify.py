"""products_changed: every statement that writes products NOTIFYs emporium_products_changed

The catalogue read cache of every replica LISTENs on it and drops its pages (see catalog_cache.py). A
statement-level trigger: one notification per writing statement, delivered at commit, none on rollback,
and it covers every writer (the API, reservations, migrations, psql).

Revision ID: 0003_products_changed_notify
Revises: 0002_product_version
Create Date: 2026-11-30
"""

from alembic import op

revision = "0003_products_changed_notify"
down_revision = "0002_product_version"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION products_changed_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('emporium_products_changed', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER products_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON products "
        "FOR EACH STATEMENT EXECUTE FUNCTION products_changed_notify()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER products_changed ON products")
    op.execute("DROP FUNCTION products_changed_notify()")
