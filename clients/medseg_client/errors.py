"""One exception tree for medseg: every refusal names what was expected and what came."""

from __future__ import annotations


class MedsegError(Exception):
    """Base of every error medseg raises on purpose (as opposed to a bug)."""


class StudyError(MedsegError, ValueError):
    """A study (volume, spacing, file or series) that medseg refuses, with the reason."""


class ServerError(MedsegError):
    """The inference server could not be started, reached or used."""


class ArtifactError(MedsegError):
    """A generated artifact (weights, ONNX, engine, config) is missing or fails its check."""


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (its whitespace runs joined), cut to ``limit`` characters: what an error line quotes."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
