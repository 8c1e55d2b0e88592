"""What the DICOM node did with each instance it received: scored, refused (with the reason) or duplicate.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_instances",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sop_instance_sha256", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(512), nullable=True),
        sa.Column("prediction_id", sa.String(32), nullable=True),
        sa.Column("report_uid", sa.String(64), nullable=True),
        sa.Column("heatmap_uid", sa.String(64), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivery_error", sa.String(512), nullable=True),
    )
    op.create_index("ix_dicom_instances_sop", "dicom_instances", ["sop_instance_sha256", "model_sha256"])
    op.create_index("ix_dicom_instances_received_at", "dicom_instances", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_dicom_instances_received_at", table_name="dicom_instances")
    op.drop_index("ix_dicom_instances_sop", table_name="dicom_instances")
    op.drop_table("dicom_instances")
