"""The one exception type for user mistakes: the CLI prints it as a one-line error."""

__all__ = ["LoraArithError", "first_line", "OptionError"]


class LoraArithError(Exception):
    """A problem with the user's input (paths, weights, files, options), not a bug.

    The CLI turns it into ``Error: <message>`` and exit status 1, without a traceback.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class OptionError(LoraArithError):
    """A user mistake in the value of one or more options (parameters), which it names.

    ``template`` is a :meth:`str.format` string: each ``{}`` is filled with the next option's
    name, each ``{key}`` with the keyword value of that name. ``str()`` names the options as the
    Python API spells them (``rank``); the command line names them by their flags (``--rank``)
    through :meth:`message`, so the library never spells a flag.
    """

    def __init__(self, options: str | tuple[str, ...], template: str, **values: object) -> None:
        self.options = (options,) if isinstance(options, str) else tuple(options)
        self.template = template
        self.values = values
        super().__init__(self.message())

    def message(self, spell=lambda option: option) -> str:
        """The message with each option named by ``spell(option)`` (default: as given)."""
        return self.template.format(*(spell(option) for option in self.options), **self.values)
