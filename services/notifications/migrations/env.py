from emporium_common.migrations import run_alembic_env
from emporium_notifications.models import SQLModel  # importing the models registers the tables

run_alembic_env(SQLModel.metadata)
