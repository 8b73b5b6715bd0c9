"""Options shared by the commands, spelled the same everywhere: ``-o/--output``, ``-f/--force``,
``--base``, ``--device``, ``--4bit/--no-4bit``, ``--adapter`` and the generation options of every
command that loads a model; :func:`option_group`, which applies several options
as one decorator; and whether to show progress bars."""

from __future__ import annotations

import sys

import click

__all__ = [
    "AliasOption",
    "output_option",
    "force_option",
    "base_option",
    "device_option",
    "four_bit_option",
    "option_group",
    "progress_wanted",
    "adapter_option",
    "model_option_decorators",
]


class AliasOption(click.Option):
    """An option that also accepts old spellings (``hidden_aliases``), kept working for one
    release but not shown in ``--help``."""

    def __init__(self, param_decls, *, hidden_aliases=(), **kwargs):
        super().__init__([*param_decls, *hidden_aliases], **kwargs)
        self.hidden_aliases = tuple(hidden_aliases)

    def get_help_record(self, ctx):
        shown, secondary = self.opts, self.secondary_opts
        self.opts = [o for o in shown if o not in self.hidden_aliases]
        self.secondary_opts = [o for o in secondary if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = shown, secondary


def output_option(help: str, *, hidden_aliases=(), **kwargs):
    """``-o/--output``, the same spelling in every command that writes."""
    return click.option("-o", "--output", "output", cls=AliasOption, hidden_aliases=hidden_aliases, help=help, **kwargs)


def force_option(
    help: str = "Replace an existing output (only a file, an empty folder or an earlier output of the same kind).",
):
    """``-f/--force``, the same spelling in every command that writes."""
    return click.option("-f", "--force", is_flag=True, help=help)


def base_option(help: str = "Base model: a local directory or a Hub id. Default: the embedded SmolLM2-135M-Instruct."):
    """``--base``, the same spelling in every command that loads a base model."""
    return click.option("--base", default=None, help=help)


def device_option(help: str = "Device to load the model on: 'cpu', 'cuda', 'cuda:N' or 'mps'. Default: CUDA when available."):
    """``--device``, the same spelling in every command that loads a model."""
    return click.option("--device", default=None, metavar="DEVICE", help=help)


def four_bit_option(default: bool, help: str):
    """``--4bit/--no-4bit``, the same spelling in every command with a 4-bit switch."""
    return click.option("--4bit/--no-4bit", "quantize_4bit", default=default, show_default=True, help=help)


def option_group(*options):
    """One decorator that applies ``options`` (click option decorators) as if they were stacked in
    this order above the command: a set of options several commands share, or one command's many."""

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def progress_wanted() -> bool:
    """Show progress bars only when stderr is a terminal."""
    return sys.stderr.isatty()


adapter_option = click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="SPEC",
    help="[NAME=]PATH[:WEIGHT] of an adapter to mix in at run time (repeatable; weight defaults to 1.0; "
    "the name defaults to the file stem).",
)


_POSITIVE = click.IntRange(min=1)


def model_option_decorators() -> list:
    """The options of every command that loads a model and generates: --base, --4bit/--no-4bit,
    --device, --batch-size, --max-new-tokens (declared once; eval, sweep and tune reuse them)."""
    return [
        base_option(),
        four_bit_option(False, "Load the base in 4-bit NF4 (bitsandbytes)."),
        device_option(),
        # at least 1 (click's usage error); 0 used to end in a traceback
        click.option("--batch-size", type=_POSITIVE, default=16, show_default=True, help="Prompts generated together."),
        click.option(
            "--max-new-tokens", type=_POSITIVE, default=128, show_default=True, help="Most tokens generated per prompt."
        ),
    ]
