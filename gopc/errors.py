"""One exception family for bad input: the CLI turns any of these into a one-line message and exit 2."""
import argparse


class GopcError(Exception):
    """Bad input from the user. The message names the field and the fix, on one line."""


class ConfigError(GopcError):
    pass


class DataError(GopcError):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """Command-line mistakes are bad input too: one line naming the argument, exit 2 (not usage + SystemExit)."""

    def error(self, message):
        raise GopcError(f"{message} (see {self.prog} --help)")
