"""Errors a user can act on: stages print their message as one line and exit non-zero."""


class FcnError(Exception):
    """Base of every error caused by input (files, parameters) rather than by a bug."""


class ParamsError(FcnError):
    """params.yaml is invalid; the message lists every problem found."""


class DataError(FcnError):
    """A dataset or output file is missing or malformed; the message names the file."""
