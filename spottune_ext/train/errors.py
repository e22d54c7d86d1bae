"""The two ways a run stops on purpose, each with a one-line message for the command line."""


class UsageError(Exception):
    """Bad input (reported like an argparse error: the message, exit status 2)."""


class Diverged(FloatingPointError):
    """Training produced non-finite numbers (the message says where and which flag to change; exit status 1)."""


def first_line(err):
    """An exception as one line: its message's first line, or its type where the message says nothing."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
