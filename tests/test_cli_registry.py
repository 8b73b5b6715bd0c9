"""The command registry is explicit: every click command defined in a command module is
registered on ``main`` under the name it declares, and nothing else is; and the command
modules stay thin (no function over 60 lines, decorators included)."""

import ast
from pathlib import Path

import click

from lora_arith import cli
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


MOST_LINES = 60
"""The longest a function in ``lora_arith/cli/`` may be, its decorators included: a command
parses, calls one library function and prints."""

def test_no_cli_function_is_over_60_lines_with_its_decorators():
    folder = Path(cli.__file__).parent
    lengths = {}
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
                lengths[(path.name, node.name)] = node.end_lineno - first + 1
    assert ("model_commands.py", "generate") in lengths  # the walk found the commands
    too_long = {key: n for key, n in lengths.items() if n > MOST_LINES}
    assert not too_long, f"over {MOST_LINES} lines, decorators included: {too_long}"
