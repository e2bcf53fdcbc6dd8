"""The errors the CLI reports as one line (`error: <message>`, exit code 2) instead of a traceback."""


class ConfigError(ValueError):
    """A bad configuration value or input file; the message is one line naming the key (or the file), the value
    and what was expected."""


class RunError(RuntimeError):
    """A run that had to stop (non-finite loss, a run dir owned by another run); one line, exit code 2."""
