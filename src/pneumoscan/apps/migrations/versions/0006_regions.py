"""Where the pneumonia is: each prediction's regions (JSON, pixels of the image), why a pneumonia has none, and the
presentation state a DICOM node sent to draw them.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("regions", sa.Text(), nullable=True))
    op.add_column("predictions", sa.Column("regions_note", sa.String(256), nullable=True))
    op.add_column("dicom_instances", sa.Column("presentation_uid", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("dicom_instances", "presentation_uid")
    op.drop_column("predictions", "regions_note")
    op.drop_column("predictions", "regions")
