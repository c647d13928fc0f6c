"""One exception family for bad input: the CLI turns any of these into a one-line message and exit 2."""


class GopcError(Exception):
    """Bad input from the user. The message names the field and the fix, on one line."""


class ConfigError(GopcError):
    pass


class DataError(GopcError):
    pass
