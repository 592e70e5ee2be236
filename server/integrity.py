"""The database's invariants as one read-only query set: `check_integrity(session)` lists what is wrong
(an empty list when nothing is). Fault tests run it after every injected failure; admins can run it with
`GET /api/integrity` (user token) or on a stopped server's DB file with `python -m server.integrity DB`."""

from __future__ import annotations

import sys

from sqlalchemy import text
from sqlmodel import Session

from server.models import FINAL_STATES, FailureClass, JobState

_STATES = tuple(s.name for s in JobState)  # SQLAlchemy stores enum members by name
_FINAL = tuple(s.name for s in FINAL_STATES)
_FAILURE_CLASSES = tuple(f.name for f in FailureClass)


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


# (what is wrong, SQL returning the ids of the offending rows)
CHECKS: list[tuple[str, str]] = [
    ("jobs in a state outside the enum", f"SELECT id FROM job WHERE state NOT IN {_in(_STATES)}"),
    ("running jobs without a worker or lease",
     "SELECT id FROM job WHERE state = 'running' AND (worker_id IS NULL OR lease_expires_at IS NULL)"),
    ("running jobs on an unknown worker",
     "SELECT id FROM job WHERE state = 'running' AND worker_id NOT IN (SELECT id FROM worker)"),
    ("queued jobs still holding a worker or lease",
     "SELECT id FROM job WHERE state = 'queued' AND (worker_id IS NOT NULL OR lease_expires_at IS NOT NULL)"),
    ("finished jobs holding a lease",
     f"SELECT id FROM job WHERE state IN {_in(_FINAL)} AND lease_expires_at IS NOT NULL"),
    ("finished jobs without finished_at", f"SELECT id FROM job WHERE state IN {_in(_FINAL)} AND finished_at IS NULL"),
    ("failed or cancelled jobs without a failure class and reason",
     "SELECT id FROM job WHERE state IN ('failed', 'cancelled') AND (failure_class IS NULL OR failure_reason IS NULL"
     " OR failure_reason = '')"),
    ("failure classes outside the enum",
     f"SELECT id FROM job WHERE failure_class IS NOT NULL AND failure_class NOT IN {_in(_FAILURE_CLASSES)}"),
    ("succeeded jobs with a failure class", "SELECT id FROM job WHERE state = 'succeeded' AND failure_class IS NOT NULL"),
    ("jobs with attempt < 1 or max_attempts < 1", "SELECT id FROM job WHERE attempt < 1 OR max_attempts < 1"),
    ("multi-node rows of jobs neither queued nor running",
     "SELECT DISTINCT job_id FROM jobnode WHERE job_id NOT IN (SELECT id FROM job WHERE state IN ('queued', 'running'))"),
    ("multi-node rows of single-node jobs",
     "SELECT DISTINCT n.job_id FROM jobnode n JOIN job j ON j.id = n.job_id WHERE j.nodes = 1"),
    ("running multi-node jobs without exactly one row per node, numbered 0..nodes-1",
     "SELECT j.id FROM job j LEFT JOIN jobnode n ON n.job_id = j.id WHERE j.state = 'running' AND j.nodes > 1 "
     "GROUP BY j.id HAVING count(n.node) != j.nodes OR min(n.node) != 0 OR max(n.node) != j.nodes - 1"),
    ("queued multi-node jobs with a complete gang of reservations",
     "SELECT n.job_id FROM jobnode n JOIN job j ON j.id = n.job_id WHERE j.state = 'queued' "
     "GROUP BY n.job_id, j.nodes HAVING count(*) >= j.nodes"),
    ("metrics of unknown jobs", "SELECT DISTINCT job_id FROM metric WHERE job_id NOT IN (SELECT id FROM job)"),
    ("duplicate (job, step) metrics", "SELECT job_id FROM metric GROUP BY job_id, step HAVING count(*) > 1"),
    ("log lines of unknown jobs", "SELECT DISTINCT job_id FROM logline WHERE job_id NOT IN (SELECT id FROM job)"),
    ("log sequence numbers at or past the job's log_count",
     "SELECT DISTINCT l.job_id FROM logline l JOIN job j ON j.id = l.job_id WHERE l.seq >= j.log_count"),
    ("events of unknown jobs", "SELECT DISTINCT job_id FROM jobevent WHERE job_id NOT IN (SELECT id FROM job)"),
    ("event ids past the job's last_event_id",
     "SELECT DISTINCT e.job_id FROM jobevent e JOIN job j ON j.id = e.job_id WHERE e.id > j.last_event_id"),
    ("jobs whose events are not numbered 1..last_event_id without gaps",
     "SELECT j.id FROM job j LEFT JOIN jobevent e ON e.job_id = j.id GROUP BY j.id "
     "HAVING count(e.id) != j.last_event_id"),
    ("jobs whose last state event disagrees with their state",
     "SELECT j.id FROM job j JOIN jobevent e ON e.job_id = j.id AND e.kind = 'state' "
     "WHERE e.id = (SELECT max(id) FROM jobevent WHERE job_id = j.id AND kind = 'state') "
     "AND {event_state} != lower(CAST(j.state AS TEXT))"),
]


# The state recorded in a state event's JSON, per SQL dialect.
EVENT_STATE_SQL = {"sqlite": "json_extract(e.data, '$.state')", "postgresql": "(e.data::json ->> 'state')"}


def check_integrity(session: Session) -> list[str]:
    """Problems found, each naming the rule and up to 10 offending ids; [] means consistent."""
    problems: list[str] = []
    conn = session.connection()
    if conn.dialect.name == "sqlite":
        rows = [r[0] for r in conn.execute(text("PRAGMA integrity_check"))]
        if rows != ["ok"]:
            problems.append("PRAGMA integrity_check: " + "; ".join(map(str, rows[:10])))
        fk = list(conn.execute(text("PRAGMA foreign_key_check")))
        if fk:
            problems.append(f"PRAGMA foreign_key_check: {len(fk)} rows, e.g. {list(fk[0])}")
    for what, sql in CHECKS:
        sql = sql.replace("{event_state}", EVENT_STATE_SQL.get(conn.dialect.name, EVENT_STATE_SQL["sqlite"]))
        ids = [r[0] for r in conn.execute(text(sql))]
        if ids:
            problems.append(f"{what}: {ids[:10]}{' ...' if len(ids) > 10 else ''}")
    return problems


def check_database_file(path: str) -> list[str]:
    from server.db import make_engine

    engine = make_engine(f"sqlite:///{path}")
    try:
        with Session(engine) as session:
            return check_integrity(session)
    finally:
        engine.dispose()


if __name__ == "__main__":
    found = check_database_file(sys.argv[1])
    print("\n".join(found) or "ok")
    sys.exit(1 if found else 0)
