"""Alembic environment: migrates on a connection batchrunner hands over, or on BATCHRUNNER_DB."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from batchrunner.config import db_url_from_env
from batchrunner.models import Base

config = context.config
target_metadata = Base.metadata
# Any constant will do: it only keeps two processes from migrating the same database at once.
PG_MIGRATION_LOCK = 72_616_373


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})"))
        context.run_migrations()


async def _run_from_url(url: str) -> None:
    from batchrunner.db import create_engine

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    url = (
        context.get_x_argument(as_dictionary=True).get("db")
        or config.get_main_option("sqlalchemy.url")
        or db_url_from_env()
    )
    asyncio.run(_run_from_url(url))
