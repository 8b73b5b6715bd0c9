"""The one exception type for user mistakes: the CLI prints it as a one-line error."""


class LoraArithError(Exception):
    """A problem with the user's input (paths, weights, files, options), not a bug.

    The CLI turns it into ``Error: <message>`` and exit status 1, without a traceback.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
