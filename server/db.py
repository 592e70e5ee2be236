"""Engine factory. SQLite runs in WAL mode: readers never wait. Write transactions start with BEGIN
IMMEDIATE (connections of `write_engine(engine)`), so one that reads and then writes never fails half-way
with SQLITE_BUSY; this process's writers take turns on a lock first, and the busy timeout covers the rest
(another process). PostgreSQL needs none of this."""

from __future__ import annotations

import threading

from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel, create_engine

SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        pool_size=10,
        max_overflow=40,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (SQLAlchemy's pysqlite recipe)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    # SQLite's busy handler retries a waiting writer with sleeps, in no order: under load an unlucky one
    # waited for seconds (bench/api_load.py). This process's writers take turns here first, in the order
    # the lock wakes them, and only then take SQLite's lock, which is then free or about to be.
    writer_turn = threading.Lock()

    def _end_turn(conn) -> None:  # type: ignore[no-untyped-def]
        if conn.info.pop(_HOLDS_TURN, False):
            writer_turn.release()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        if not conn.get_execution_options().get(_WRITE):
            conn.exec_driver_sql("BEGIN")
            return
        writer_turn.acquire()
        conn.info[_HOLDS_TURN] = True
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _end_turn(conn)
            raise

    event.listen(engine, "commit", _end_turn)
    event.listen(engine, "rollback", _end_turn)
    return engine


_WRITE = "paratrain_write"
_HOLDS_TURN = "paratrain_holds_writer_turn"


def write_engine(engine: Engine) -> Engine:
    """The same pool, but each transaction takes SQLite's write lock up front."""
    return engine.execution_options(**{_WRITE: True})


def init_db(engine: Engine) -> None:
    from server import models  # noqa: F401  (registers the tables)

    SQLModel.metadata.create_all(engine)
    add_missing_columns(engine)


def add_missing_columns(engine: Engine) -> None:
    """A database made by an older paratrain lacks the nullable columns added since (create_all makes
    missing tables, never missing columns): add them, so upgrading keeps the stored jobs. Anything more
    than a new nullable column would need a real migration tool."""
    existing = inspect(engine)
    with engine.begin() as conn:
        for table in SQLModel.metadata.sorted_tables:
            have = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have and column.nullable:
                    kind = column.type.compile(dialect=engine.dialect)
                    conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')


