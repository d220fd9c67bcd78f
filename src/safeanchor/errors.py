"""One exception type for every user-facing problem: the CLI prints its message and exits 2."""


class SafeAnchorError(Exception):
    """A problem the user can fix. The message names the problem and the fix, on one line."""
