"""Radiologists' readings of the predictions: what the radiologist found, who read it and when (append-only).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "readings",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("prediction_id", sa.String(32), sa.ForeignKey("predictions.id"), nullable=False, index=True),
        sa.Column("finding", sa.String(16), nullable=False),
        sa.Column("reader", sa.String(64), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("readings")
