"""The ``lora-arith`` command line. Each command lives in its own module and imports heavy
libraries (transformers, peft, trl) only inside its body, so start-up stays fast."""

from __future__ import annotations

import sys

import click

from lora_arith import __version__
from lora_arith.errors import LoraArithError


class _Group(click.Group):
    """A group that turns :class:`LoraArithError` into a one-line error and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LoraArithError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lora-arith")
def main() -> None:
    """Preference vectors as LoRA adapters.

    Train each preference with DPO twice (on the pairs, and on the pairs swapped),
    take the difference as a preference vector, and mix vectors at test time with
    your own weights. All arithmetic is done exactly on the low-rank factors.
    """


def progress_wanted() -> bool:
    """Show progress bars only when stderr is a terminal."""
    return sys.stderr.isatty()


# Importing a command module registers its commands on ``main``.
from lora_arith.cli import adapter_commands, eval_commands, model_commands, serve_command, share_commands, train_commands  # noqa: E402,F401,E501
