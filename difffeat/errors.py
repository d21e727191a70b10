"""The one exception type for mistakes a user can fix (bad paths, bad flags, bad input files).

The CLI prints such an error as one line, without a traceback; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; its message names the file or option and the reason."""
