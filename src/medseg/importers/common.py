"""What every importer shares: a valid model name, DICOM codes for the card's labels."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from medseg_client.card import ModelCard
from medseg_client.errors import ArtifactError
from medseg_client.spec import SPEC, Code, Label

NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
RESERVED = {SPEC.ensemble.name, SPEC.preprocess.name, SPEC.segmenter.name, SPEC.postprocess.name}


def check_name(name: str, repository: Path) -> None:
    """Refuse a name Triton or the repository cannot take: lower-case letters, digits, underscores; not the
    shipped model's."""
    if not NAME.fullmatch(name):
        raise ArtifactError(f"--name {name!r}: expected lower-case letters, digits and underscores, starting with a letter")
    if name in RESERVED or any(name == r.rsplit("_", 1)[0] for r in RESERVED):
        raise ArtifactError(f"--name {name!r}: taken by the shipped liver model's models ({', '.join(sorted(RESERVED))})")
    if not repository.is_dir():
        raise ArtifactError(f"--model-repository {repository}: not a folder")


def with_label_codes(card: ModelCard, path: Path) -> ModelCard:
    """The card with DICOM codes (and optionally display names and colours) for its labels from a JSON file:
    ``{"liver": {"category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
    "type": {...}, "region": {...}, "display": "Liver", "color": [r, g, b]}, ...}``."""
    try:
        given = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"--label-codes {path}: not a readable JSON file ({e})") from None
    unknown = sorted(set(given) - {lab.name for lab in card.labels})
    if unknown:
        raise ArtifactError(f"--label-codes {path}: no label named {', '.join(unknown)} in the model "
                            f"(its labels: {', '.join(lab.name for lab in card.labels[1:])})")
    labels = []
    for lab in card.labels:
        g = given.get(lab.name, {})
        try:
            codes = {k: Code(**g[k]) if g.get(k) else getattr(lab, k) for k in ("category", "type", "region")}
        except TypeError as e:
            raise ArtifactError(f"--label-codes {path}: {lab.name}: a code needs value, scheme and meaning ({e})") from None
        color = tuple(int(c) for c in g.get("color", lab.color))
        if len(color) != 3:
            raise ArtifactError(f"--label-codes {path}: {lab.name}: color must be [r, g, b], got {g['color']}")
        labels.append(Label(lab.value, lab.name, str(g.get("display", lab.display)), (color[0], color[1], color[2]),
                            codes["category"], codes["type"], codes["region"]))
    return replace(card, labels=tuple(labels))
