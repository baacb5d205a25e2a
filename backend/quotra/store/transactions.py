"""Running the call core's transactions: whole transactions, not statements, cross to the database.

`Transactions.run(work, *args)` runs `work(connection, *args)` — a plain synchronous function of a
SQLAlchemy `Connection` — inside one transaction and returns its result once it is committed. The
connection it gets is a `quotra.store.direct.Direct` over it: the call path's registered
statements run on the driver's cursor, anything else through SQLAlchemy.

- SQLite: one writer thread owns one connection. Work queued by concurrent callers is run as one
  transaction (group commit, `BEGIN IMMEDIATE` … `COMMIT`), each piece in its own SAVEPOINT so that
  one failure rolls back only its own writes; every caller hears back after the COMMIT. One thread
  hop per piece of work instead of one per statement, one durable commit per batch, and no two
  connections ever queue on SQLite's write lock.
- PostgreSQL: each piece of work is its own transaction on the async engine's pool
  (`AsyncConnection.run_sync`); replicas race through row locks and conditional updates. A
  deadlock or serialization failure is retried a few times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import StaticPool

from quotra.store.db import sqlite_pragmas
from quotra.store.direct import Direct, Statements

log = logging.getLogger("quotra.store")

T = TypeVar("T")
MAX_BATCH: Final = 256
# PostgreSQL's SQLSTATEs for a deadlock and a serialization failure: the work is retried.
_RETRYABLE: Final = frozenset({"40P01", "40001"})
_RETRIES: Final = 3


@dataclass
class _Job:
    work: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = field(default=None)

    def deliver(self) -> None:
        def settle() -> None:
            if self.future.done():  # the caller gave up (cancelled); the work stands
                return
            if self.error is not None:
                self.future.set_exception(self.error)
            else:
                self.future.set_result(self.result)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(settle)


class _SqliteWriter:
    """The one connection that writes the call core's rows, on its own thread."""

    def __init__(self, url: str) -> None:
        sync_url = make_url(url).set(drivername="sqlite")
        self.engine: Engine = create_sync_engine(
            sync_url, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )

        @event.listens_for(self.engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy, not the driver, opens transactions
            sqlite_pragmas(dbapi_connection)

        @event.listens_for(self.engine, "begin")
        def _begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="quotra-sqlite-writer", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)
        self.engine.dispose()

    def _serve(self) -> None:
        statements = Statements()
        with self.engine.connect() as connection:
            while True:
                first = self.jobs.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        job = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stop = True
                        break
                    batch.append(job)
                self._commit(Direct(connection, statements), batch)
                if stop:
                    return

    @staticmethod
    def _commit(connection: Direct, batch: list[_Job]) -> None:
        try:
            with connection.begin():
                if len(batch) == 1:
                    job = batch[0]
                    job.result = job.work(connection, *job.args)
                else:
                    for job in batch:
                        try:
                            with connection.savepoint():
                                job.result = job.work(connection, *job.args)
                        except Exception as exc:  # this job's writes are rolled back, not the batch's
                            job.error = exc
        except Exception as exc:  # BEGIN or COMMIT failed (or the only job): nothing was committed
            for job in batch:
                if job.error is None:
                    job.error = exc
        connection.close()
        for job in batch:
            job.deliver()


class Transactions:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._writer = _SqliteWriter(str(engine.url)) if self.dialect == "sqlite" else None
        self._statements = Statements()

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        if self._writer is not None:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()
            self._writer.submit(_Job(work, args, loop, future))
            return await future
        for attempt in range(_RETRIES):
            try:
                async with self.engine.begin() as connection:
                    return await connection.run_sync(self._direct, work, *args)
            except DBAPIError as exc:
                code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
                if code not in _RETRYABLE or attempt == _RETRIES - 1:
                    raise
                log.info("transaction retried", extra={"sqlstate": code, "attempt": attempt + 1})
        raise AssertionError("unreachable")

    def _direct(self, connection: Connection, work: Callable[..., T], *args: Any) -> T:
        direct = Direct(connection, self._statements)
        try:
            return work(direct, *args)
        finally:
            direct.close()

    async def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await asyncio.to_thread(writer.close)
