"""Errors a user can act on: stages print their message as one line and exit non-zero."""

import re


class FcnError(Exception):
    """Base of every error caused by input (files, parameters) rather than by a bug."""


class ParamsError(FcnError):
    """params.yaml is invalid; the message lists every problem found."""


class DataError(FcnError):
    """A dataset or output file is missing or malformed; the message names the file."""


_UNSAFE = re.compile(r"Unsupported global: GLOBAL (\S+)")


def torch_load_problem(exc: Exception) -> str:
    """One line saying why `torch.load(weights_only=True)` refused a file: its own message is
    paragraphs of advice, including how to load the file unsafely."""
    text = str(exc)
    unsafe = _UNSAFE.search(text)
    if unsafe:
        return (f"refused: it holds a pickled Python object ({unsafe.group(1)}), which "
                "weights-only loading never runs (only tensors and plain values are read)")
    if "Weights only load failed" in text:
        return ("not a readable PyTorch checkpoint (its data is not what torch.save writes "
                "for tensors and plain values)")
    if isinstance(exc, EOFError) or "zip archive" in text:
        return "truncated or damaged: not a complete PyTorch file"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"not a readable PyTorch checkpoint ({first[:200]})"
