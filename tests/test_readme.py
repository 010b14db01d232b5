"""The README and docs/ say only what the CLI does: every `medseg ...` command they quote exists, with the flags
they give it, and every file they point to is in the repository."""

from __future__ import annotations

import argparse
import re

from medseg.paths import REPO_ROOT
from medseg_client.cli import build_parser

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _code(text: str) -> list[str]:
    """The lines of fenced blocks and the inline code spans of a Markdown text."""
    blocks = re.findall(r"(?ms)^```[^\n]*\n(.*?)^```", text)
    inline = re.sub(r"(?ms)^```.*?^```", "", text)
    return [line for b in blocks for line in b.splitlines()] + re.findall(r"`([^`\n]+)`", inline)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def quoted_commands(text: str) -> list[str]:
    """Every ``medseg <command> ...`` the text quotes as code (up to a shell comment or the span's end)."""
    out = []
    for line in _code(text):
        for m in re.finditer(r"(?<![\w./-])medseg ([a-z][a-z-]*[^#`\n]*)", line):
            out.append(m.group(1).strip())
    return out


def problems(command: str, root: argparse.ArgumentParser) -> list[str]:
    """What in ``command`` (the words after ``medseg``) the CLI does not have."""
    words = command.split()
    parser, path = root, ["medseg"]
    while words and (subs := _subparsers(parser)):
        name = words[0].rstrip(":,;.")
        if name.startswith("<"):  # `medseg <command> --help`: a placeholder
            return []
        if name not in subs:
            return [f"`{' '.join(path)} {name}`: no such command (has {', '.join(subs)})"]
        parser, path, words = subs[name], [*path, name], words[1:]
    known = _options(parser)
    return [f"`{' '.join(path)}` has no {flag}" for flag in FLAG.findall(" ".join(words)) if flag not in known]


def test_the_checker_finds_a_missing_flag_and_an_unknown_command() -> None:
    root = build_parser()
    assert quoted_commands("run `medseg segment --url h:1 x --out y` or\n```\nmedseg serve --flavor cpu  # --not-a-flag\n```") \
        == ["serve --flavor cpu", "segment --url h:1 x --out y"]
    assert problems("segment --url h:1 x --out y", root) == []
    assert problems("segment --fast x", root) == ["`medseg segment` has no --fast"]
    assert problems("mig plan t.yaml --gpu 0", root) == []
    assert problems("mig explode t.yaml", root)[0].startswith("`medseg mig explode`: no such command")
    assert problems("train --epochs 3", root)[0].startswith("`medseg train`: no such command")


def test_every_command_the_docs_quote_exists_with_its_flags() -> None:
    root = build_parser()
    found = {doc.name: quoted_commands(doc.read_text()) for doc in DOCS}
    assert len(found["README.md"]) >= 5, found["README.md"]  # the README does quote the commands it documents
    wrong = [f"{doc}: {p}" for doc, commands in found.items() for c in commands for p in problems(c, root)]
    assert wrong == []


def test_every_repository_file_the_docs_point_to_exists() -> None:
    """Paths quoted as code (``docs/mig.md``, ``perf/results/...``) that name a file or folder of this checkout."""
    tops = {p.name for p in REPO_ROOT.iterdir()} - {".git"}
    missing = []
    for doc in DOCS:
        for span in _code(doc.read_text()):
            for token in span.split():
                token = token.strip("(),;:.'\"")
                first = token.split("/")[0]
                if "/" not in token or first not in tops or any(c in token for c in "<>*{}$"):
                    continue
                if not (REPO_ROOT / token).exists() and not (REPO_ROOT / first).is_symlink():
                    missing.append(f"{doc.name}: {token}")
    generated = ("demo_out", ".cache", ".venv", ".perf_tools")  # made by the make targets
    assert [m for m in missing if not m.split(": ")[1].startswith(generated)] == []
