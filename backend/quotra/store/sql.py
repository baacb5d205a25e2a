"""What the repositories share: statements that differ per dialect (SQLite, PostgreSQL), and rows
read as records."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")


def record(cls: type[R], row: Any) -> R:
    """A dataclass record from a row (a mapped object or a result row) whose columns have the names
    of its fields."""
    return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


def insert_ignore(dialect: str, table: Table, values: dict[str, Any] | None = None) -> Any:
    """INSERT that does nothing when the row (its primary or a unique key) already exists; without
    `values`, the row comes as the parameters of each execution."""
    make = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = make(table) if values is None else make(table).values(**values)
    return statement.on_conflict_do_nothing()
