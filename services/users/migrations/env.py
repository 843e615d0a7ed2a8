from emporium_common.migrations import run_alembic_env
from emporium_users import models  # registers the tables on SQLModel.metadata

run_alembic_env(models.SQLModel.metadata)
