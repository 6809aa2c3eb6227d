"""User-facing errors: one line that names what was wrong and how to fix it."""


class FairdiffError(Exception):
    """An error caused by the user's input (a path, a config value, a file).

    The CLI prints ``str(err)`` as a single line and exits with status 2 instead of a traceback, so the
    message must say what was wrong, what is allowed, and how to fix it.
    """
