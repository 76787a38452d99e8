"""The one error type lmtune raises for problems a user can fix."""


class LmtuneError(Exception):
    """A known problem: the message says what is wrong and how to fix it.

    The CLI prints it as one red line and exits with `exit_code` (1; 128 + signal number for a run
    stopped by a signal); `LMTUNE_DEBUG=1` shows the traceback. `everywhere`: every process of a run raises
    it together (a decision they share), so only the first process prints it.
    """

    def __init__(self, message: str, exit_code: int = 1, everywhere: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.everywhere = everywhere


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (its type name if it has none), for a one-line error."""
    return (str(err).splitlines() or [type(err).__name__])[0]
