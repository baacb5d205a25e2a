"""The call path's statements, run straight on the driver's cursor.

Every statement of the paid call's transactions is a module-level SQLAlchemy Core construct with
bind parameters, registered here with `prepared(...)`. `Direct(connection)` is what those
transactions receive: for a registered statement it binds the values in the compiled order,
applies the columns' type conversions, executes on the DBAPI cursor of the transaction's own
connection and returns the rows; anything else goes to SQLAlchemy unchanged. Each statement is
compiled once per dialect and set of value keys, by SQLAlchemy, so the SQL is exactly what
SQLAlchemy would send.

Why: SQLAlchemy's execution layer (execution context, parameter construction, result metadata
and cursor strategy) cost about as much CPU per statement as SQLite executing it; a paid call runs
seven statements (`make bench`'s profile of the prepaid path, README "Relay benchmark").

What is supported is what the call path uses, checked when a statement is first compiled:
named bind parameters (literal values included), Python-side column defaults and `onupdate`
functions, RETURNING and SELECT rows with their result types; not expanding `IN` parameters.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

S = TypeVar("S", bound=ClauseElement)
_Processor = Callable[[Any], Any] | None

_REGISTERED: Final[set[int]] = set()


def prepared(statement: S) -> S:
    """Marks a module-level statement (built once, never garbage) to run directly."""
    _REGISTERED.add(id(statement))
    return statement


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # the bind parameters in the order the driver takes them
    binds: tuple[_Processor, ...]  # each one's type conversion
    literals: Mapping[str, Any]  # values fixed in the statement (`status == "active"`)
    generated: tuple[
        tuple[str, Callable[[], Any]], ...
    ]  # Python-side defaults, `onupdate` (no-argument functions)
    row: Any  # the rows' type (a named tuple), for a statement that returns rows
    results: tuple[_Processor, ...]

    @classmethod
    def of(cls, statement: ClauseElement, dialect: Dialect, keys: tuple[str, ...]) -> _Compiled:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        assert isinstance(compiled, SQLCompiler)
        if compiled.post_compile_params or compiled.literal_execute_params or compiled.escaped_bind_names:
            raise ValueError(f"not a statement to run directly: {compiled.string[:80]}")
        generated: list[tuple[str, Callable[[], Any]]] = []
        for column in (*compiled.insert_prefetch, *compiled.update_prefetch):
            default: Any = column.default if column in compiled.insert_prefetch else column.onupdate
            make = (
                functools.partial(default.arg, None)
                if default.is_callable
                else itertools.repeat(default.arg).__next__
            )
            generated.append((column.key, make))
        names = tuple(compiled.positiontup or ())
        processors: Mapping[str, Any] = compiled._bind_processors
        columns = compiled._result_columns
        row: Any = namedtuple("Row", [entry.keyname for entry in columns], rename=True) if columns else None
        return cls(
            sql=compiled.string,
            names=names,
            binds=tuple(processors.get(name) for name in names),
            literals={
                name: bind.value
                for name, bind in compiled.binds.items()
                if not bind.required and name in names
            },
            generated=tuple(generated),
            row=row,
            results=tuple(entry.type._cached_result_processor(dialect, None) for entry in columns),
        )

    def arguments(self, values: Mapping[str, Any]) -> list[Any]:
        if self.generated:
            values = {**values, **{key: make() for key, make in self.generated if key not in values}}
        literals = self.literals
        arguments = []
        for name, process in zip(self.names, self.binds, strict=True):
            value = values[name] if name in values else literals[name]
            arguments.append(value if process is None else process(value))
        return arguments

    def rows(self, raw: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        assert self.row is not None
        make, processors = self.row._make, self.results
        if not any(processors):
            return [make(values) for values in raw]
        return [
            make(
                [
                    value if process is None else process(value)
                    for value, process in zip(values, processors, strict=True)
                ]
            )
            for values in raw
        ]


class DirectResult:
    """The part of SQLAlchemy's `Result` the call path uses."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rowcount: int, rows: list[tuple[Any, ...]]) -> None:
        self.rowcount = rowcount
        self._rows = rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._rows)

    def all(self) -> list[tuple[Any, ...]]:
        return list(self._rows)

    def first(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def one(self) -> tuple[Any, ...]:
        if len(self._rows) != 1:
            raise ValueError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalar_one_or_none(self) -> Any:
        if len(self._rows) > 1:
            raise ValueError(f"expected at most one row, got {len(self._rows)}")
        return self.scalar()

    def scalars(self) -> Iterator[Any]:
        return (row[0] for row in self._rows)


class Statements:
    """The compiled statements of one database (its dialect), shared by its transactions."""

    def __init__(self) -> None:
        self._compiled: dict[tuple[int, tuple[str, ...]], _Compiled] = {}

    def get(self, statement: ClauseElement, dialect: Dialect, keys: tuple[str, ...]) -> _Compiled:
        compiled = self._compiled.get((id(statement), keys))
        if compiled is None:
            compiled = self._compiled[id(statement), keys] = _Compiled.of(statement, dialect, keys)
        return compiled


class Direct:
    """A transaction's connection for the call path: registered statements on the driver's
    cursor, everything else (and every other attribute) through SQLAlchemy's `Connection`."""

    def __init__(self, connection: Connection, statements: Statements) -> None:
        self.connection = connection
        self.dialect = connection.dialect
        self._statements = statements
        self._cursor: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)

    def execute(self, statement: Any, parameters: Mapping[str, Any] | None = None) -> Any:
        if id(statement) not in _REGISTERED:
            return self.connection.execute(statement, parameters)
        values = parameters or {}
        compiled = self._statements.get(statement, self.dialect, tuple(values))
        cursor = self._driver_cursor()
        arguments = compiled.arguments(values)
        try:
            cursor.execute(compiled.sql, arguments)
        except self.dialect.loaded_dbapi.Error as exc:  # raised as SQLAlchemy raises it (IntegrityError…),
            self._cursor = None  # which closes the cursor
            self.connection._handle_dbapi_exception(exc, compiled.sql, arguments, cursor, None)
        if compiled.row is None:
            return DirectResult(cursor.rowcount, [])
        rows = compiled.rows(cursor.fetchall())
        return DirectResult(len(rows), rows)

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """What runs inside is rolled back alone if it raises (SQLAlchemy's `begin_nested` compiles
        a new statement for each savepoint's name)."""
        self._driver_cursor().execute("SAVEPOINT quotra_work")
        try:
            yield
        except BaseException:
            self._driver_cursor().execute("ROLLBACK TO SAVEPOINT quotra_work")
            raise
        finally:
            self._driver_cursor().execute("RELEASE SAVEPOINT quotra_work")

    def _driver_cursor(self) -> Any:
        if self._cursor is None:
            self._cursor = self.connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        return self._cursor

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None
