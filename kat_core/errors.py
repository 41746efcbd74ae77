"""User-facing errors.

A `KatError` is something the user can fix (bad config, bad data, missing file, unreachable server).
The CLI prints its message as one line and exits non-zero; everything else is a bug and keeps its traceback.
"""


class KatError(Exception):
    """An error the user caused and can fix; its message is the one line they will read."""


class ValidationFailed(KatError):
    """Data did not pass validation; carries the path of the report that explains why."""

    def __init__(self, message: str, report_path: str | None = None):
        super().__init__(message)
        self.report_path = report_path
