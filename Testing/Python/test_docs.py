"""The README and the guides in docs/ cannot rot: every relative link points to a file (and heading) that
exists, every `msis` command in a shell block is accepted by the real argument parser, every script a shell
block runs exists, and every Python block compiles and imports only names the Lib has. Cheap: nothing runs."""

import ast
import contextlib
import importlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from MSInstanceSaliencyLib.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL = {"bash", "sh", "console", "shell"}
# Commands of shell blocks that are not msis and name no script of ours: allowed as they are.
OTHER_COMMANDS = {"mkdir", "cp", "cat", "printf", "pip", "git", "Slicer", "lst", "dask", "ssh"}
# How a shell line runs msis: the tokens that stand for `msis` (argv follows them).
MSIS_FORMS = [["msis"], [".venv/bin/msis"], ["bash", "scripts/msis.sh"], ["scripts/msis.sh"],
              ["python", "-m", "MSInstanceSaliencyLib"], [".venv/bin/python", "-m", "MSInstanceSaliencyLib"]]
SHELL_OPERATORS = {">", ">>", "|", "&&", "||", ";", "&"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(path: Path):
    """(language, first line number, lines) of every fenced code block of a Markdown file."""
    lang, start, body = None, 0, []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"\s*```(\S*)", line)
        if fence and lang is None:
            lang, start, body = fence.group(1).lower(), no + 1, []
        elif fence:
            yield lang, start, body
            lang = None
        elif lang is not None:
            body.append(line)


def _shell_lines(start: int, body: list):
    """(line number, text) of each command of a shell block: `\\` continuations joined, here-document bodies
    skipped, `$ ` prompts removed."""
    heredoc_end, pending, pending_no = None, "", 0
    for no, line in enumerate(body, start):
        if heredoc_end is not None:
            heredoc_end = None if line.strip() == heredoc_end else heredoc_end
            continue
        if not pending:
            pending_no = no
        pending += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        text, pending = pending.strip().removeprefix("$ "), ""
        heredoc = re.search(r"<<-?\s*'?\"?(\w+)", text)
        if heredoc:
            heredoc_end, text = heredoc.group(1), text[:heredoc.start()]
        if text and not text.startswith("#"):
            yield pending_no, text


def _msis_argv(tokens: list):
    """The arguments after `msis` when the tokens run msis in one of its forms, else None."""
    for form in MSIS_FORMS:
        if tokens[:len(form)] == form:
            return tokens[len(form):]
    return None


def _check_shell_line(text: str) -> str | None:
    """None when the command is fine, else why not."""
    tokens = shlex.split(text, comments=True)
    cut = next((i for i, t in enumerate(tokens) if t in SHELL_OPERATORS), len(tokens))
    tokens = tokens[:cut]
    if all(re.fullmatch(r"[A-Za-z_]\w*=\S*", t) for t in tokens):  # only shell variables set (or nothing)
        return None
    scripts = [t for t in tokens[:2] if t.startswith("scripts/")]
    missing = [s for s in scripts if not (ROOT / s).is_file()]
    if missing:
        return f"runs {missing[0]}, which does not exist"
    argv = _msis_argv(tokens)
    if argv is not None:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                build_parser().parse_args(argv)
        except SystemExit:
            return f"msis refuses its arguments: {stderr.getvalue().strip()}"
        return None
    if scripts or tokens[0] in OTHER_COMMANDS:
        return None
    return f"unknown command {tokens[0]!r} (neither msis nor a script of ours; add it to OTHER_COMMANDS if it is meant)"


def _headings(path: Path) -> set:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_relative_links_resolve(doc):
    problems = []
    text = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), doc.read_text(encoding="utf-8"), flags=re.S)
    for no, line in enumerate(text.splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (doc.parent / file_part).resolve() if file_part else doc
            if not linked.exists():
                problems.append(f"{_rel(doc)}:{no}: link to {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in _headings(linked):
                problems.append(f"{_rel(doc)}:{no}: link to {target}: no heading with that anchor in {linked.name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_shell_commands_parse(doc):
    problems = []
    for lang, start, body in _blocks(doc):
        if lang in SHELL:
            problems += [f"{_rel(doc)}:{no}: {why}: {text}" for no, text in _shell_lines(start, body)
                         if (why := _check_shell_line(text))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_python_and_json_blocks(doc):
    """Python blocks compile and their `from MSInstanceSaliencyLib... import names` import; JSON blocks load."""
    problems = []
    for lang, start, body in _blocks(doc):
        where = f"{_rel(doc)}:{start}"
        if lang == "json":
            try:
                json.loads("\n".join(body))
            except ValueError as exc:
                problems.append(f"{where}: JSON block does not load: {exc}")
        if lang != "python":
            continue
        try:
            tree = ast.parse("\n".join(body), filename=where)
        except SyntaxError as exc:
            problems.append(f"{where}: Python block does not compile: {exc}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "MSInstanceSaliencyLib":
                module = importlib.import_module(node.module)
                problems += [f"{_rel(doc)}:{start + node.lineno - 1}: {node.module} has no {a.name}"
                             for a in node.names if not hasattr(module, a.name)]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "MSInstanceSaliencyLib":
                        importlib.import_module(a.name)
    assert not problems, "\n".join(problems)


def test_the_checks_see_the_guides_commands():
    """The block reader finds what the guides show (a broken fence would make the checks above vacuous)."""
    msis_lines = [text for doc in DOCS for lang, start, body in _blocks(doc) if lang in SHELL
                  for _, text in _shell_lines(start, body) if _msis_argv(shlex.split(text, comments=True)) is not None]
    commands = {_msis_argv(shlex.split(t, comments=True))[0] for t in msis_lines}
    assert {"demo", "phantom", "segment", "explain", "cohort", "features", "train-classifier"} <= commands
    python_blocks = [doc.name for doc in DOCS for lang, _, _ in _blocks(doc) if lang == "python"]
    assert {"PYTHON.md", "COHORTS.md", "SLICER.md"} <= set(python_blocks)
    # the checker itself refuses what it should
    assert _check_shell_line("msis segment FLAIR.nii.gz --out") and _check_shell_line("msis sgement x --out d")
    assert _check_shell_line("bash scripts/no_such_script.sh") and _check_shell_line("rm -rf demo_out")
    assert _check_shell_line("msis segment FLAIR.nii.gz T1.nii.gz --out out/  # a comment") is None
