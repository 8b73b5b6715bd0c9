"""The command registry is explicit: every click command defined in a command module is
registered on ``main`` under the name it declares, and nothing else is."""

import click

from lora_arith.cli import COMMANDS, adapter_commands, eval_commands, main, model_commands
from lora_arith.cli import serve_command, share_commands, train_commands


def test_every_command_defined_is_registered_under_its_own_name():
    modules = [adapter_commands, eval_commands, model_commands, serve_command, share_commands, train_commands]
    defined = {
        value.name: value for module in modules for value in vars(module).values() if isinstance(value, click.Command)
    }
    assert len(defined) >= 17
    assert COMMANDS == defined
    assert main.commands == COMMANDS
