"""User-facing errors: raised before heavy work starts, with what is wrong and how to fix it."""


class LLMPruneError(ValueError):
    """A problem with the user's input or environment that they can fix."""
