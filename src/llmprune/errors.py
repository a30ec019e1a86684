"""User-facing errors: raised before heavy work starts, with what is wrong and how to fix it.

:func:`user_error` is the one place that turns an exception raised by a library (the disk, the
serialisers, the unpickler) into the same kind of one-line error; anything it does not know
stays a traceback, since that is a bug of ours.
"""

from __future__ import annotations

import errno
import pickle

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class LLMPruneError(ValueError):
    """A problem with the user's input or environment that they can fix."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` says the disk (or quota) is full: an OSError, or safetensors' Rust error."""
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        return True
    text = str(e)
    return type(e).__name__ == "SafetensorError" and ("os error 28" in text or "No space left" in text)


def user_error(e: BaseException) -> LLMPruneError | None:
    """A one-line :class:`LLMPruneError` for a library exception the user can act on, else None."""
    if isinstance(e, LLMPruneError):
        return e
    if is_no_space(e):
        return LLMPruneError(f"no space left on the device ({_first_line(e)}); free some space and run again")
    if isinstance(e, pickle.UnpicklingError):
        return LLMPruneError(f"refused to unpickle a file: {_first_line(e)[:120]}. llmprune loads pickled "
                             "checkpoints only as plain tensors (torch weights_only); convert a checkpoint "
                             "you trust to safetensors")
    if type(e).__name__ == "SafetensorError":
        return LLMPruneError(f"safetensors: {_first_line(e)}")
    return None
