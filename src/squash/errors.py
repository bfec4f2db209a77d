"""squash's own error types. The CLI prints one line for each and exits non-zero."""


class SquashError(Exception):
    """A problem with what the user gave squash: the message names the thing and what to do."""


class RecipeError(SquashError, ValueError):
    """An invalid recipe value."""


class FormatError(SquashError):
    """A file that is missing, truncated, corrupt, or of an unsupported format or version."""


class QualityError(SquashError):
    """A compressed model the guard refuses (squash.eval.guard): broken past what anyone would accept."""
