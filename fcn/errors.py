"""Errors a user can act on: stages print their message as one line and exit non-zero."""

import re


class FcnError(Exception):
    """Base of every error caused by input (files, parameters) rather than by a bug."""


class ParamsError(FcnError):
    """params.yaml is invalid; the message lists every problem found."""


class DataError(FcnError):
    """A dataset or output file is missing or malformed; the message names the file."""


def one_line(exc: FcnError) -> str:
    """The error's own message. A DataLoader worker's error reaches the main process re-raised
    as the same class holding "Caught DataError in DataLoader worker process 0", the worker's
    traceback and, on its last line, `fcn.errors.DataError: <message>`: that message."""
    text = str(exc)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    for cls in type(exc).__mro__:
        for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
            if last.startswith(prefix):
                return last[len(prefix):]
    return last


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
