"""User-facing errors and the process exit codes ntdist uses.

A `UserError` is a mistake the user can fix (a typo in a config key, a missing
dataset, an incompatible world size). The CLI prints its message on one line
and exits with `EXIT_USAGE`; no traceback unless `--debug` is given.
"""

import difflib

EXIT_OK = 0
EXIT_FAILURE = 1      # an unexpected error (a bug, or something ntdist did not foresee)
EXIT_USAGE = 2        # a UserError: bad config, bad input, missing files
EXIT_PREEMPTED = 3    # SIGTERM received: a checkpoint was written, resume with --resume
EXIT_PEER_LOST = 4    # another rank died or timed out


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

    exit_code = EXIT_USAGE


class PeerLostError(UserError):
    """A collective timed out or a peer rank disappeared."""

    exit_code = EXIT_PEER_LOST


def suggest(name: str, choices) -> str:
    """Return ' (did you mean X?)' for the closest valid choice, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
