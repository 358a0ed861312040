"""README.md and docs/: the README stays short, relative links resolve, and every `governor` command in a
fenced code block is one the real CLI accepts (parsed only: no command runs, no engine, no network)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import typer
import typer.main

try:  # typer carries its own copy of click since 0.2x; older releases use click itself
    from typer._click import Context
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click import Context
    from click.exceptions import UsageError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_CHARS = 12_000

FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
PROMPT = re.compile(r"^\s*(?:\$\s+)?")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"…|<[^<>]+>")
# `<path>`, `<vLLM arguments>`: a word to fill in, not a redirection (a shell would read `<` as one)
PLACEHOLDER_WORD = re.compile(r"<([A-Za-z](?:[^<>|&;]*[^\s<>|&;])?)>")
INLINE_CODE = re.compile(r"(`+).*?\1", re.DOTALL)
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


# --- Markdown ---------------------------------------------------------------------------------------------


def split_fences(text: str) -> tuple[str, list[list[str]]]:
    """The text outside fenced code blocks, and each block's lines (CommonMark: a block closes on a fence of
    the same character at least as long; an unclosed one runs to the end)."""
    prose: list[str] = []
    blocks: list[list[str]] = []
    fence = ""
    for line in text.splitlines():
        match = FENCE.match(line)
        if not fence:
            if match:
                fence = match.group(1)
                blocks.append([])
            else:
                prose.append(line)
        elif match and match.group(1).startswith(fence) and not line.strip(fence[0] + " \t"):
            fence = ""
        else:
            blocks[-1].append(line)
    return "\n".join(prose), blocks


def shell_lines(block: list[str]) -> Iterator[str]:
    """A code block's lines with backslash continuations joined."""
    pending = ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.MULTILINE)}


def relative_links(page: Path) -> list[str]:
    """Link targets in the page's prose (not in code) that are not URLs."""
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    prose = INLINE_CODE.sub("", prose)
    targets = LINK.findall(prose) + REFERENCE.findall(prose)
    return [t for t in targets if not SCHEME.match(t)]


def broken_links(page: Path) -> list[str]:
    """Relative links to a missing file, or to a heading a Markdown page does not have."""
    name = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        path = unquote(path.split("?", 1)[0])
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{name}: {target} (no {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{name}: {target} (no heading #{anchor} there)")
    return broken


# --- Commands ---------------------------------------------------------------------------------------------


def cut_at_operator(line: str) -> str:
    """The line up to its first shell operator or comment outside quotes (`|`, `&&`, `;`, `>`, `2>`, `#`…):
    what follows belongs to another command or to a redirection, not to governor's arguments."""
    quote = ""
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == quote:
                quote = ""
            elif ch == "\\" and quote == '"':
                i += 1
        elif ch == "\\":
            i += 1
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
        elif ch in "|&;<>()":
            start = i
            while start > 0 and line[start - 1].isdigit():
                start -= 1
            # `2>`: a file descriptor is part of the operator when it is a word of its own
            return line[:start] if start == 0 or line[start - 1].isspace() else line[:i]
        i += 1
    return line


def governor_args(line: str) -> list[str] | None:
    """The arguments of a line that runs `governor` (after a `$ ` prompt and `NAME=value` prefixes; the
    program may be a path such as `.venv/bin/governor`), else None."""
    line = PROMPT.sub("", line, count=1)
    line = PLACEHOLDER_WORD.sub(lambda m: m.group(1).replace(" ", "_"), line)
    try:
        words = shlex.split(cut_at_operator(line))
    except ValueError:  # unbalanced quotes: not a shell line
        return None
    while words and ENV_ASSIGNMENT.match(words[0]):
        words.pop(0)
    if not words or (words[0] != "governor" and not words[0].endswith("/bin/governor")):
        return None
    return words[1:]


def parse(command: Any, args: list[str]) -> Context:
    """Parse `governor ARGS` as click does before it runs anything, down to the command named, and return
    that command's context. Only parsing: `make_context` calls no command's callback, and a group's own
    callback (with or without `invoke_without_command`) runs in `invoke`, which is never called here."""
    ctx = command.make_context("governor", list(args))
    while hasattr(ctx.command, "resolve_command"):  # a group: the subcommand and its arguments are left over
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args  # click < 8.2
        rest = [*protected, *ctx.args]
        if not rest:
            if ctx.command.invoke_without_command:
                return ctx
            ctx.fail("Missing command.")
        name, sub, rest = ctx.command.resolve_command(ctx, rest)
        ctx = sub.make_context(name, rest, parent=ctx)
    return ctx


@dataclass
class Checked:
    found: int = 0
    parsed: int = 0
    skipped: list[str] = field(default_factory=list)  # placeholders (`…`, `<path>`) the CLI cannot take
    failures: list[str] = field(default_factory=list)


def check_commands(command: Any, texts: dict[str, str]) -> Checked:
    """Every fenced `governor` line of each text, parsed by `command`."""
    checked = Checked()
    for where, text in texts.items():
        for block in split_fences(text)[1]:
            for line in shell_lines(block):
                args = governor_args(line)
                if args is None:
                    continue
                checked.found += 1
                try:
                    with contextlib.redirect_stdout(io.StringIO()):  # `--help` prints, then exits 0
                        parse(command, args)
                except typer.Exit as exc:
                    if exc.exit_code != 0:
                        checked.failures.append(f"{where}: {line.strip()}: exit {exc.exit_code}")
                        continue
                except UsageError as exc:
                    target = checked.skipped if PLACEHOLDER.search(line) else checked.failures
                    target.append(f"{where}: {line.strip()}: {exc.format_message()}")
                    continue
                checked.parsed += 1
    return checked


@pytest.fixture(scope="module")
def governor_cli() -> Any:
    """The `governor` command as `governor.cli.main:main` assembles it. main() adds the bench, eval and adapters
    commands when it runs, so it runs here, on a private copy of the module (the shared one is left as it
    is), with `--help`: the only thing that then runs is the help text."""
    spec = importlib.util.find_spec("governor.cli.main")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv, sys.argv = sys.argv, ["governor", "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            module.main()
    finally:
        sys.argv = argv
    assert exited.value.code == 0, out.getvalue()
    return typer.main.get_command(module.app)


# --- Tests ------------------------------------------------------------------------------------------------


def test_readme_is_short() -> None:
    size = len(README.read_bytes())  # bytes, as `wc -c` counts: never fewer than characters
    assert size <= README_MAX_CHARS, f"README.md is {size} bytes; move detail into docs/"


def test_relative_links_resolve() -> None:
    assert len(PAGES) > 1, "no pages under docs/"
    broken = [b for page in PAGES for b in broken_links(page)]
    assert not broken, "\n".join(broken)


def test_link_check_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# There\n\n## Some section, here\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#some-section-here) [web](https://example.com/x) [self](#top) `[code](gone.md)`\n"
        "[missing](gone.md) [no heading](there.md#nowhere)\n\n[ref]: also-gone.txt\n\n"
        "```\n[in a block](gone-too.md)\n```\n# Top\n",
        encoding="utf-8",
    )
    broken = broken_links(page)
    assert [b.split(": ", 1)[1].split(" (")[0] for b in broken] == ["gone.md", "there.md#nowhere", "also-gone.txt"]


def test_every_page_is_linked_both_ways() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {page.relative_to(ROOT)}"
        back = {(page.parent / t.partition("#")[0]).resolve() for t in relative_links(page)}
        assert README.resolve() in back, f"{page.relative_to(ROOT)} does not link back to README.md"


def test_documented_commands_parse(governor_cli: Any) -> None:
    texts = {str(page.relative_to(ROOT)): page.read_text(encoding="utf-8") for page in PAGES}
    checked = check_commands(governor_cli, texts)
    assert checked.found >= 5, f"only {checked.found} fenced governor commands found: is the extractor broken?"
    assert not checked.failures, "\n".join(checked.failures)
    assert checked.parsed >= 0.8 * checked.found, "too many placeholders:\n" + "\n".join(checked.skipped)


def fenced(*lines: str) -> dict[str, str]:
    return {"planted": "Text.\n\n```bash\n" + "\n".join(lines) + "\n```\n"}


def test_checker_fails_on_bad_commands(governor_cli: Any) -> None:
    checked = check_commands(
        governor_cli,
        fenced(
            "governor serve --no-such-option",
            "governor no-such-command",
            "governor adapters no-such-command",
            "governor bench load --users many",  # an int option given a word
            "governor adapters merge adapters/x",  # --out is required
            "governor serve --port 8001 extra-argument",
            "governor bench",  # a group with no command
        ),
    )
    assert (checked.found, checked.parsed, len(checked.failures)) == (7, 0, 7), checked
    assert "No such option" in checked.failures[0] and "--no-such-option" in checked.failures[0]
    assert "No such command 'no-such-command'" in checked.failures[1]
    assert "No such command 'no-such-command'" in checked.failures[2]


def test_checker_reads_shell_lines_as_the_shell_does(governor_cli: Any) -> None:
    checked = check_commands(
        governor_cli,
        fenced(
            "$ GOVERNOR_LORA=false A=1 governor serve --port 8001 --no-lora | tee serve.log",
            "governor bench load --users 4 \\",
            "    --run-time 60s --mix base 2>&1 > out.txt && echo done   # a comment",
            ".venv/bin/governor adapters --url http://gw:9000 list --json; governor model path",
            "governor serve --help",
            "governor serve --model <path> --port 1",  # a placeholder the CLI takes as it is
            "governor bench load --users <n> --run-time …",  # one it cannot (an int): skipped, not failed
            "make serve   # not governor",
            "echo governor serve --no-such-option",
        ),
    )
    assert (checked.found, checked.parsed, checked.failures) == (6, 5, []), checked
    assert len(checked.skipped) == 1 and "--users" in checked.skipped[0]
    assert governor_args("X=1 governor serve --port 8001 2>err.log") == "serve --port 8001".split()
    assert governor_args("governor eval loops --url 'http://h:1/#x' # note") == "eval loops --url http://h:1/#x".split()
    assert governor_args("governor serve --users 2 > out") == "serve --users 2".split()
    assert governor_args("ls ~/.cache/governor") is None and governor_args("~/.cache/governor") is None


def test_parsing_runs_no_callback(governor_cli: Any) -> None:
    """A group's callback runs only when the group is invoked: parsing sets up no admin client, and a group
    that runs without a subcommand does not run either."""
    ctx = parse(governor_cli, ["adapters", "--url", "http://gw:9000", "list", "--json"])
    assert ctx.command.name == "list" and ctx.params == {"as_json": True}
    assert ctx.parent is not None and ctx.parent.params["url"] == "http://gw:9000"
    assert ctx.parent.obj is None  # `connect`, the adapters group's callback, would have set it

    ran: list[str] = []
    app = typer.Typer()

    @app.callback(invoke_without_command=True)
    def top(flag: bool = typer.Option(False, "--flag")) -> None:
        ran.append("group")

    @app.command()
    def sub(value: int = typer.Option(0, "--value")) -> None:
        ran.append("sub")

    @app.command()
    def other() -> None:
        ran.append("other")

    command = typer.main.get_command(app)
    assert parse(command, ["--flag"]).params == {"flag": True}
    assert parse(command, ["sub", "--value", "3"]).params == {"value": 3}
    with pytest.raises(UsageError):
        parse(command, ["sub", "--value", "three"])
    assert ran == []
