"""The README stays a front page, and no relative link in it or in the docs site is broken.

The site itself is built by ``mkdocs build --strict`` in ``.ci/run``; these checks need no mkdocs.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 400

# [text](target) and ![alt](target), with an optional "title"; reference definitions `[x]: target`.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def relative_links(text: str) -> list[str]:
    """The relative link targets of a Markdown text, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [t for t in targets if not urlsplit(t).scheme and not t.startswith(("#", "//", "mailto:"))]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file = unquote(urlsplit(target).path)
        resolved = (ROOT / file.lstrip("/")) if file.startswith("/") else (path.parent / file)
        if not resolved.exists():
            broken.append(target)
    return broken


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move sections into docs/"


def test_the_readme_links_into_the_docs():
    links = relative_links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert any(link.startswith("docs/") and link.endswith(".md") for link in links)
    assert (ROOT / "mkdocs.yml").is_file() and (DOCS / "index.md").is_file()


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(path):
    assert broken_links(path) == []


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](page.md) ![img](missing.png) [gone](nowhere/file.md#part) `[code](skipped.md)`\n"
        "```\n[fenced](skipped-too.md)\n```\n[web](https://example.com/x.md) [anchor](#here)\n",
        encoding="utf-8",
    )
    assert broken_links(page) == ["missing.png", "nowhere/file.md#part"]


def test_the_result_images_in_the_docs_are_copies_of_examples_results():
    """docs/images/results/X is a copy of examples/results/X (mkdocs serves only files under docs/)."""
    copies = sorted((DOCS / "images" / "results").rglob("*.png"))
    assert copies
    for copy in copies:
        original = ROOT / "examples" / "results" / copy.relative_to(DOCS / "images" / "results")
        assert original.is_file() and original.read_bytes() == copy.read_bytes(), (
            f"{copy.relative_to(ROOT)} differs from {original.relative_to(ROOT)}: copy it again"
        )


COMMAND_LINE = re.compile(r"(?:^|[\s;&|(])(?:lora-arith|-m lora_arith)[ \t]+([^\n]*)")


def code_of(text: str) -> str:
    """The code of a Markdown or help text: its code blocks, its code spans (one that starts with a
    command's name, as in the README's table, is read as a command line) and its indented example
    lines (continuation lines joined)."""
    from lora_arith.cli import COMMANDS

    blocks = [match.group(0).split("\n", 1)[-1].rsplit("\n", 1)[0] for match in FENCE.finditer(text)]
    prose = re.sub(r"\\\n\s*", " ", FENCE.sub("", text))
    spans = [span.strip("`") for span in (match.group(0) for match in CODE_SPAN.finditer(prose))]
    command = re.compile(rf"(?:{'|'.join(COMMANDS)}) (?![A-Z_][A-Z0-9_]*=)")  # not the shell's `export NAME=`
    spans = [f"lora-arith {span}" if command.match(span) else span for span in spans]
    examples = [line for line in prose.splitlines() if re.match(r"\s+(lora-arith|python -m lora_arith)\s", line)]
    return "\n".join([*blocks, *spans, *examples])


def command_lines(text: str) -> list[str]:
    """The arguments of every ``lora-arith ...`` (or ``python -m lora_arith ...``) in the code of a
    text (continuation lines joined, comments dropped), up to a ``&&``, ``|`` or ``;``."""
    code = re.sub(r"\\\n\s*", " ", code_of(text))
    code = re.sub(r"(^|\s)#.*", "", code, flags=re.M)  # comments
    found = []
    for match in COMMAND_LINE.finditer(code):
        rest = re.split(r"\s(?:&&|\|\||\||;)\s", match.group(1))[0]
        found.append(" ".join(rest.split()))
    return found


def unknown_options(arguments: str) -> list[str]:
    """What in one command line the CLI does not know: the command, or an option of it."""
    import shlex

    from lora_arith.cli import COMMANDS

    try:
        tokens = shlex.split(arguments)
    except ValueError:  # an unbalanced quote
        tokens = arguments.split()
    if not tokens or tokens[0].startswith("-") or tokens[0].isupper():  # --help, --version; COMMAND
        return []
    command = COMMANDS.get(tokens[0])
    if command is None:
        return [f"no command {tokens[0]!r}"]
    known = {opt for param in command.params for opt in (*param.opts, *getattr(param, "secondary_opts", []))}
    known |= {"--help", "-h"}
    # "[--api-key KEY]", "--method cat|svd": the flags of a synopsis too
    words = (part.strip("[](){}") for token in tokens[1:] for part in token.split("|"))
    flags = (word.split("=")[0] for word in words if re.match(r"--?[a-zA-Z]", word))
    return [f"{tokens[0]} has no option {flag}" for flag in flags if flag not in known]


def documented_command_lines() -> list[tuple[str, str]]:
    from lora_arith.cli import COMMANDS

    lines = [(path.name, line) for path in markdown_files() for line in command_lines(path.read_text(encoding="utf-8"))]
    for name, command in COMMANDS.items():
        helps = [command.help or "", *(getattr(param, "help", None) or "" for param in command.params)]
        lines += [(f"lora-arith {name} --help", line) for line in command_lines("\n".join(helps))]
    return lines


def test_every_documented_command_line_uses_options_that_exist():
    """Every ``lora-arith`` command line in the README, the docs and the commands' --help texts
    names a registered command and only options it has (a renamed flag is found here)."""
    lines = documented_command_lines()
    assert len(lines) > 60
    problems = [(where, line, unknown) for where, line in lines if (unknown := unknown_options(line))]
    assert not problems


def test_a_wrong_option_in_the_docs_is_found():
    assert command_lines("```bash\nlora-arith combine a:1 \\\n   --metod svd -o x  # comment\n```") == [
        "combine a:1 --metod svd -o x"
    ]
    assert unknown_options("combine a:1 --metod svd -o x") == ["combine has no option --metod"]
    assert unknown_options("combnie a:1") == ["no command 'combnie'"]
    assert unknown_options("combine a:1 --method=svd --rank 4 -o x -f") == []
    # an example in a --help text, continued over lines; a synopsis in brackets; a table's code span
    assert command_lines("Example:\n  lora-arith sweep --vector a=b \\\n      --gird=-1,0,1 -o x/\n") == [
        "sweep --vector a=b --gird=-1,0,1 -o x/"
    ]
    assert unknown_options("combine [--bogus 1] [-o|--outptu X]") == [
        "combine has no option --bogus",
        "combine has no option --outptu",
    ]
    assert command_lines("| `combine SPEC... -o OUT [--metod cat|svd]` | combine |") == [
        "combine SPEC... -o OUT [--metod cat|svd]"
    ]
