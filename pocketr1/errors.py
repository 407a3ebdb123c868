"""User-facing errors: the CLI prints their message as one sentence and exits non-zero, no traceback."""


class UserError(Exception):
    """Bad input from the user (a path, a file, a config key). The message must say what and where."""
