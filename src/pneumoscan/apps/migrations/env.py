"""Alembic environment: runs the audit-log migrations on the connection pneumoscan hands it."""

from alembic import context

from pneumoscan.apps.audit import metadata

connection = context.config.attributes.get("connection")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
