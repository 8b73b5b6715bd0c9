"""The ``lora-arith`` command line: the ``main`` group and its explicit command registry
(:data:`COMMANDS`). Each command lives in its own module, takes its shared options from
:mod:`lora_arith.cli.options`, and imports heavy libraries (transformers, peft, trl) only inside
its body, so start-up stays fast."""

from __future__ import annotations

import atexit
import errno
import functools
import gc
import os
import sys

import click

from lora_arith import __version__
from lora_arith.cli import (  # the command modules import only lora_arith.cli.options: no cycle
    adapter_commands,
    eval_commands,
    model_commands,
    serve_command,
    share_commands,
    train_commands,
)
from lora_arith._internal.errors import LoraArithError, OptionError
from lora_arith.cli.options import progress_wanted


def flag(command: click.Command | None, option: str) -> str:
    """How ``command`` spells the option the library calls ``option``: its first long flag
    (``max_rank`` → ``--max-rank``, ``quantize_4bit`` → ``--4bit``)."""
    for param in getattr(command, "params", ()):
        if isinstance(param, click.Option) and param.name == option:
            return next((o for o in param.opts if o.startswith("--")), param.opts[0])
    return "--" + option.replace("_", "-")


_USER_ERRNOS = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}
"""What the file system may answer about a user's path or disk: reported in one line, not as a bug."""


class _Group(click.Group):
    """A group that turns :class:`LoraArithError` into a one-line error and exit status 1; an
    :class:`OptionError` names its options by the command's flags."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LoraArithError as error:
            if isinstance(error, OptionError):
                command = self.commands.get(ctx.invoked_subcommand or "")
                error = error.message(lambda option: flag(command, option))
            click.echo(f"Error: {error}", err=True)
            sys.exit(1)
        except OSError as error:
            if error.errno not in _USER_ERRNOS:
                raise
            # the file system refused a path the user gave: a full disk, a read-only folder, a name too long
            where = f": {error.filename}" if error.filename else ""
            click.echo(f"Error: {error.strerror}{where}", err=True)
            sys.exit(1)


@functools.cache  # registered once, however often main() runs in one process
def _freeze_heap_at_exit() -> None:
    """Have the garbage collector skip every object alive at interpreter exit (``gc.freeze``, run
    by ``atexit`` after the command). Shutdown still releases everything and runs every
    finalizer, but its collections no longer walk torch's import-time heap: about 0.4 s of each
    command's wall time on 2 CPUs (``benchmarks/bench_combine.py`` measures the whole process)."""
    atexit.register(gc.freeze)  # registered first, so it runs after the handlers registered later


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lora-arith")
def main() -> None:
    """Preference vectors as LoRA adapters.

    Train each preference with DPO twice (on the pairs, and on the pairs swapped),
    take the difference as a preference vector, and mix vectors at test time with
    your own weights. All arithmetic is done exactly on the low-rank factors.
    """
    _freeze_heap_at_exit()


def run() -> None:
    """The ``lora-arith`` script and ``python -m lora_arith``: :func:`main` in a process of its own.

    Off a terminal (stderr a pipe or a file) the libraries' progress bars follow the rule of
    lora-arith's own, which show only on a terminal: transformers' and huggingface_hub's
    ("Loading weights", downloads; read when they are imported, later) and every other tqdm bar
    (TRL's reference log-probs, the default base's first conversion). Set here, in the process's
    environment, not in :func:`main`, which tests call in-process; a variable the user set wins.
    """
    if not progress_wanted():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    main()


COMMANDS = {
    "combine": adapter_commands.combine,
    "extract": adapter_commands.extract,
    "inspect": adapter_commands.inspect,
    "similarity": adapter_commands.similarity,
    "interference": adapter_commands.interference,
    "convert": adapter_commands.convert,
    "train": train_commands.train_command,
    "vector": train_commands.vector_command,
    "generate": model_commands.generate,
    "chat": model_commands.chat,
    "eval": eval_commands.evaluate_command,
    "sweep": eval_commands.sweep,
    "tune": eval_commands.tune,
    "serve": serve_command.serve,
    "export": share_commands.export,
    "merge": share_commands.merge,
    "push": share_commands.push,
}
"""Every command, registered explicitly (name → click command)."""

for _name, _command in COMMANDS.items():
    main.add_command(_command, _name)
