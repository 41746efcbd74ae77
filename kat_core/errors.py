"""User-facing errors.

A `KatError` is something the user can fix (bad config, bad data, missing file, unreachable server).
The CLI prints its message as one line and exits non-zero; everything else is a bug and keeps its traceback.
"""


class KatError(Exception):
    """An error the user caused and can fix; its message is the one line they will read."""


def first_line(e: BaseException) -> str:
    """The first line of a library's exception message (its type's name when it has none), to quote in a
    KatError's one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ValidationFailed(KatError):
    """Data did not pass validation; carries the path of the report that explains why."""

    def __init__(self, message: str, report_path: str | None = None):
        super().__init__(message)
        self.report_path = report_path


class NotFound(KatError):
    """Something named in the request does not exist (a web answer: 404)."""


class Invalid(KatError):
    """The request's values cannot be used; the message says which and why (422)."""


class Conflict(KatError):
    """The request is valid but the state does not allow it now (409)."""


class GateRefused(Conflict):
    """The promotion gate keeps the champion: the candidate is not better within the margins."""
