"""User-facing errors: a wrong argument, a missing file, a task that cannot be built.

The command line prints a `PartsError` as one line (no traceback) and exits with status 2;
everything else is a bug and keeps its traceback.
"""


class PartsError(Exception):
    """A problem with the user's input, with a message that names the problem and the fix."""
