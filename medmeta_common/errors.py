"""Domain errors: each says what went wrong, where, and what to do.

Every error a user can cause (a bad file, a bad config, an exhausted privacy budget)
is one of these types. The CLI turns them into a one-line message and an exit code,
never a traceback.
"""

from __future__ import annotations


class MedmetaError(Exception):
    """Base class of every error medmeta reports to a user."""

    exit_code: int = 1


class ConfigError(MedmetaError):
    """A configuration file or value is invalid.

    Parameters
    ----------
    source : str
        The file (or other origin, such as ``"--rounds"``) the value came from.
    field : str
        Dotted path of the offending field, e.g. ``"federation.sites[1].data.path"``.
    expected : str
        What a valid value looks like.
    found : str
        What was found instead.
    hint : str, optional
        A suggestion, such as a "did you mean" correction.

    """

    exit_code = 2

    def __init__(
        self, *, source: str, field: str, expected: str, found: str, hint: str = ""
    ) -> None:
        self.source = source
        self.field = field
        self.expected = expected
        self.found = found
        self.hint = hint
        where = f"{source}: {field}" if field else source
        message = f"{where}: expected {expected}, found {found}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class DataError(MedmetaError):
    """A data file or folder cannot be used.

    Parameters
    ----------
    file : str
        The file or folder at fault, as the user named it.
    reason : str
        Why it cannot be used, in words a hospital engineer can act on.

    """

    exit_code = 3

    def __init__(self, file: str, reason: str) -> None:
        self.file = file
        self.reason = reason
        super().__init__(f"{file}: {reason}")


class CheckpointError(MedmetaError):
    """A checkpoint or saved model is missing, corrupt or incompatible."""

    exit_code = 4


class PrivacyBudgetError(MedmetaError):
    """Training would spend more privacy budget than the site allows."""

    exit_code = 5


class FederationError(MedmetaError):
    """The federation could not run or complete (too few sites, engine failure)."""

    exit_code = 6


class PrivacyAuditError(MedmetaError):
    """An empirical privacy audit contradicts the claimed ε, or cannot test it."""

    exit_code = 7
