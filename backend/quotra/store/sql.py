"""Statements the repositories share that differ per dialect (SQLite, PostgreSQL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert


def insert_ignore(dialect: str, table: Table, values: dict[str, Any] | None = None) -> Any:
    """INSERT that does nothing when the row (its primary or a unique key) already exists; without
    `values`, the row comes as the parameters of each execution."""
    make = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = make(table) if values is None else make(table).values(**values)
    return statement.on_conflict_do_nothing()
