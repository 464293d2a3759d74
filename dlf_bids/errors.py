"""Errors a user can act on, each tied to the documented exit code of the BIDS-App.

The command line catches :class:`DlfBidsError`, prints its one-line message and exits with its
``exit_code``; anything else is a bug and keeps its traceback.
Exit codes follow the draft BIDS-Apps execution spec (see README, "Exit codes").
"""

EXIT_OK = 0
EXIT_BIDS_VALIDATION = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_FILES = 18
EXIT_USAGE = 64
EXIT_BAD_DATA = 65
EXIT_MISSING_INPUT = 66
EXIT_RESOURCES = 69  # sysexits EX_UNAVAILABLE: the run cannot fit the memory it is given
EXIT_CANT_WRITE = 73  # sysexits EX_CANTCREAT: the output or work dir cannot be written
EXIT_PROCESSING_FAILED = 1


class DlfBidsError(Exception):
    """An error explained to the user in one line."""

    exit_code = EXIT_PROCESSING_FAILED


class UsageError(DlfBidsError):
    exit_code = EXIT_USAGE


class BadDataError(DlfBidsError):
    exit_code = EXIT_BAD_DATA


class MissingInputError(DlfBidsError):
    exit_code = EXIT_MISSING_INPUT


class NoFilesSelectedError(DlfBidsError):
    exit_code = EXIT_NO_FILES


class BIDSValidationError(DlfBidsError):
    exit_code = EXIT_BIDS_VALIDATION


class ResourceError(DlfBidsError):
    """The run, as asked, would exceed ``--mem-gb`` (foreseen before any work)."""

    exit_code = EXIT_RESOURCES


class CannotWriteError(DlfBidsError):
    """The output or work directory cannot be created or written."""

    exit_code = EXIT_CANT_WRITE
