"""``chronos man``: manual pages in roff, made from the CLI's own help.

One page for ``chronos`` (every command, its arguments, options and the exit
codes) so ``man chronos`` says what ``--help`` says and cannot drift from it.
Written by hand rather than with click-man: that package has been unmaintained
for years and pulls in setuptools at run time; the roff needed is small.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import click

from chronos import __version__

EXIT_CODES = (
    ("0", "success"),
    ("1", "another Chronos error"),
    ("2", "bad input (an option, a size, a duration, an id)"),
    ("3", "refused: no capacity now, or over a quota or policy limit"),
    ("4", "no such partition or queued request"),
    ("5", "not allowed (another user's partition)"),
    ("6", "the partition already ended"),
    ("7", "the daemon could not be reached"),
    ("8", "a malformed message on the daemon socket"),
    ("9", "a GPU backend failed or found no device"),
    ("10", "timed out waiting (--wait --timeout)"),
    ("124", "chronos run: the partition's end stopped the command"),
    ("125", "chronos run: Chronos itself failed (bad option, refused, no daemon)"),
    ("126", "chronos run: the command is not executable"),
    ("127", "chronos run: the command was not found"),
    ("other", "chronos run: the command's own exit status (128+N: killed by signal N)"),
)


def _esc(text: str) -> str:
    """Escape roff's special characters, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def render_page(group: click.Group) -> str:
    ctx = click.Context(group, info_name="chronos")
    today = datetime.date.today().isoformat()
    out = [
        f'.TH CHRONOS 1 "{today}" "chronos {__version__}" "User Commands"',
        ".SH NAME",
        "chronos \\- " + _esc((group.help or "").split("\n")[0]),
        ".SH SYNOPSIS",
        ".B chronos",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH COMMANDS",
    ]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        out.extend(_command(ctx, name, command))
    out.append(".SH EXIT STATUS")
    for code, meaning in EXIT_CODES:
        out.extend([".TP", f".B {code}", _esc(meaning)])
    out.extend(
        [
            ".SH ENVIRONMENT",
            ".TP\n.B NO_COLOR\nNo colour in tables, even on a terminal.",
            ".TP\n.B CHRONOS_PARTITION_ID\nSet inside a partition; chronos run warns or, with"
            " \\-\\-reuse, runs in it.",
            ".SH SEE ALSO",
            "chronosd(8); docs/CLI.md in the source tree.",
        ]
    )
    return "\n".join(out) + "\n"


def _command(parent: click.Context, name: str, command: click.Command) -> list[str]:
    ctx = click.Context(command, info_name=name, parent=parent)
    usage = " ".join(command.collect_usage_pieces(ctx))
    out = [".SS " + _esc(f"chronos {name} {usage}".strip())]
    for paragraph in _paragraphs(command.help or ""):
        out.extend([_esc(paragraph), ".PP"])
    if isinstance(command, click.Group):
        for sub in command.list_commands(ctx):
            child = command.get_command(ctx, sub)
            if child is not None:
                out.extend(_command(parent, f"{name} {sub}", child))
    for param in command.params:
        record = param.get_help_record(ctx)
        if record is None:
            continue
        flags, text = record
        out.extend([".TP", f".B {_esc(flags)}", _esc(text)])
    return out


def write_pages(group: click.Group, directory: str | None) -> Iterator[str]:
    """Write chronos.1 into ``directory`` (and yield its path), or yield the page itself."""
    page = render_page(group)
    if directory is None:
        yield page.rstrip("\n")
        return
    path = Path(directory) / "chronos.1"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    yield f"wrote {path}"
