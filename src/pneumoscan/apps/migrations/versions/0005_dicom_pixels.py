"""The decoded image's sha256 beside each DICOM instance's row: duplicates are the same UID *and* the same pixels.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dicom_instances", sa.Column("pixels_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("dicom_instances", "pixels_sha256")
