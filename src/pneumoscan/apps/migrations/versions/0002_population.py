"""Population and operating point of each prediction (models validated on children and adults).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("population", sa.String(16), nullable=True))
        batch.add_column(sa.Column("population_source", sa.String(64), nullable=True))
        batch.add_column(sa.Column("operating_point", sa.String(128), nullable=True))
        batch.add_column(sa.Column("population_note", sa.String(256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("population_note")
        batch.drop_column("operating_point")
        batch.drop_column("population_source")
        batch.drop_column("population")
