"""Statements the repositories share that differ per dialect (SQLite, PostgreSQL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert


def insert_ignore(dialect: str, table: Table, values: dict[str, Any]) -> Any:
    """INSERT that does nothing when the row (its primary or a unique key) already exists."""
    make = pg_insert if dialect == "postgresql" else sqlite_insert
    return make(table).values(**values).on_conflict_do_nothing()
