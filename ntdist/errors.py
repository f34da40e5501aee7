"""The errors that end an ntdist command, each with its own process exit code.

`NtdistError` carries the exit code; the CLI prints its message on one line and
exits with that code (no traceback unless `--debug`). Its kinds are siblings:

- `UserError`: a mistake the user can fix (a typo in a config key, a missing
  dataset, an incompatible world size);
- `Preempted`: SIGTERM arrived, the state is on disk, `--resume` continues;
- `PeerLostError`: another rank died or a collective timed out.
"""

import difflib

EXIT_FAILURE = 1      # an unexpected error (a bug, or something ntdist did not foresee)
EXIT_USAGE = 2        # a UserError: bad config, bad input, missing files
EXIT_PREEMPTED = 3    # SIGTERM received: a checkpoint was written, resume with --resume
EXIT_PEER_LOST = 4    # another rank died or timed out


class NtdistError(Exception):
    """An error whose message is meant for the user; `exit_code` is what the process returns."""

    exit_code = EXIT_FAILURE


class UserError(NtdistError):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

    exit_code = EXIT_USAGE


class Preempted(NtdistError):
    """Raised at an epoch boundary after SIGTERM, once the state is on disk."""

    exit_code = EXIT_PREEMPTED


class PeerLostError(NtdistError):
    """A collective timed out or a peer rank disappeared."""

    exit_code = EXIT_PEER_LOST


def suggest(name: str, choices) -> str:
    """Return " (did you mean 'X'?)" for the closest valid choice, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_choice(value, choices, what: str) -> None:
    """UserError naming `what`, the closest valid choice and all of them, unless `value` is one of `choices`."""
    if value not in choices:
        raise UserError(f"unknown {what} '{value}'{suggest(str(value), choices)}; choose one of {list(choices)}")
