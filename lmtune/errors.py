"""The one error type lmtune raises for problems a user can fix."""


class LmtuneError(Exception):
    """A known problem: the message says what is wrong and how to fix it.

    The CLI prints it as one red line and exits 1; `LMTUNE_DEBUG=1` shows the traceback.
    """
