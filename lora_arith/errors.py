"""The one exception type for user mistakes: the CLI prints it as a one-line error."""


class LoraArithError(Exception):
    """A problem with the user's input (paths, weights, files, options), not a bug.

    The CLI turns it into ``Error: <message>`` and exit status 1, without a traceback.
    """
