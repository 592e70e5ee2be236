"""Domain errors raised by crud, queue and job_events and turned into HTTP answers by handlers in server.main."""

from __future__ import annotations


class NotFound(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} not found")


class Conflict(Exception):
    """The request is valid but the resource's state forbids it (409)."""


class Superseded(Exception):
    """A worker process whose name another process registered since (410): it must stop, not register again."""


class StaleConfig(Conflict):
    """A job's stored config fails today's TrainConfig (stored by an older, looser server)."""


class FieldError(Exception):
    """Bad input that pydantic could not see (a path outside the roots, a missing file): 422 naming the field."""

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg
