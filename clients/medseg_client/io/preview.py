"""A picture a radiologist can judge at a glance: axial and coronal CT with the labels overlaid.

Panels: the axial slice through each listed tumor (up to three, else the liver's largest slice) and
the coronal slice through the liver's centre, displayed in a soft-tissue window, resampled to square
pixels, with each tumor's number (and confidence) drawn as in findings.json; below them the study's status:
what was reported or, in orange, why nothing was.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medseg_client.spec import SPEC, Label

DISPLAY_WINDOW = (-160.0, 240.0)  # soft-tissue display window (HU), for pictures only
PANEL = 384
ALPHA = 0.45


def _gray(ct2d: np.ndarray) -> np.ndarray:
    lo, hi = DISPLAY_WINDOW
    return (np.clip((ct2d.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _overlay(ct2d: np.ndarray, lab2d: np.ndarray, classes: Sequence[Label]) -> np.ndarray:
    rgb = np.repeat(_gray(ct2d)[..., None], 3, axis=2).astype(np.float32)
    for label in classes[1:]:
        m = lab2d == label.value
        rgb[m] = (1 - ALPHA) * rgb[m] + ALPHA * np.asarray(label.color, np.float32)
    return rgb.astype(np.uint8)


def _panel(rgb: np.ndarray, pixel_mm: tuple[float, float], title: str,
           marks: Sequence[tuple[float, float, str]]) -> Image.Image:
    """Resize to square millimetres inside a PANEL-sized square; draw the marks (row, col, text)."""
    h_mm, w_mm = rgb.shape[0] * pixel_mm[0], rgb.shape[1] * pixel_mm[1]
    scale = PANEL / max(h_mm, w_mm)
    size = (max(1, round(w_mm * scale)), max(1, round(h_mm * scale)))
    img = Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (PANEL, PANEL + 18), (0, 0, 0))
    ox, oy = (PANEL - size[0]) // 2, 18 + (PANEL - size[1]) // 2
    canvas.paste(img, (ox, oy))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((4, 2), title, fill=(230, 230, 230), font=font)
    for row, col, text in marks:
        x = ox + (col + 0.5) * pixel_mm[1] * scale
        y = oy + (row + 0.5) * pixel_mm[0] * scale
        draw.ellipse((x - 9, y - 9, x + 9, y + 9), outline=(255, 255, 0), width=2)
        draw.text((x + 11, y - 16), text, fill=(255, 255, 0), font=font)
    return canvas


def _mark(tumor: dict[str, Any]) -> str:
    """A tumor's number as in findings.json, with its confidence where there is one."""
    conf = tumor.get("confidence")
    return f"{tumor['id']}" + ("" if conf is None else f" ({conf:.2f})")


def render_preview(ct: np.ndarray, labels: np.ndarray, spacing: Sequence[float], findings: dict[str, Any],
                   classes: Sequence[Label] = SPEC.labels) -> Image.Image:
    """The montage for a canonical (z, y, x) study with z increasing towards the head."""
    sz, sy, sx = (float(s) for s in spacing)
    tumors = findings.get("tumors", [])[:3]
    # the labelled slab only (one max-pass over the study finds it): labelled voxels per slice and per row
    zs = np.flatnonzero(labels.reshape(labels.shape[0], -1).max(axis=1))
    organ = labels[zs[0] : zs[-1] + 1] > 0 if zs.size else np.zeros((0, *labels.shape[1:]), bool)
    per_slice, per_row = organ.sum(axis=(1, 2)), organ.sum(axis=(0, 2))
    if tumors:
        axial_slices = [min(ct.shape[0] - 1, max(0, int(np.rint(t["centroid_voxel_zyx"][0])))) for t in tumors]
    else:
        axial_slices = [int(zs[0] + np.argmax(per_slice))] if zs.size else [ct.shape[0] // 2]
    panels = []
    for k, z in enumerate(axial_slices):
        marks = [(t["centroid_voxel_zyx"][1], t["centroid_voxel_zyx"][2], _mark(t))
                 for t in findings.get("tumors", []) if abs(t["centroid_voxel_zyx"][0] - z) < 0.5 + 5.0 / sz]
        title = f"axial slice {z + 1}/{ct.shape[0]}" + (f" - tumor {tumors[k]['id']}" if tumors else "")
        panels.append(_panel(_overlay(ct[z], labels[z], classes), (sy, sx), title, marks))
    y = int(np.rint(per_row @ np.arange(len(per_row)) / per_row.sum())) if zs.size else ct.shape[1] // 2
    coronal_ct, coronal_lab = ct[::-1, y, :], labels[::-1, y, :]  # head at the top
    marks = [(ct.shape[0] - 1 - t["centroid_voxel_zyx"][0], t["centroid_voxel_zyx"][2], _mark(t))
             for t in findings.get("tumors", [])]
    panels.append(_panel(_overlay(coronal_ct, coronal_lab, classes), (sz, sx), f"coronal row {y + 1}/{ct.shape[1]}", marks))
    legend_h = 40
    out = Image.new("RGB", (PANEL * len(panels), PANEL + 18 + legend_h), (0, 0, 0))
    for i, p in enumerate(panels):
        out.paste(p, (i * PANEL, 0))
    draw = ImageDraw.Draw(out)
    liver = findings.get("liver", {})
    if "labels" in findings:  # an imported model: each class's volume
        text = "   ".join(f"{c['name']} {c['volume_ml']:.0f} mL" for c in findings["labels"][:4]) + "   image left = patient right"
    else:
        text = (f"liver {liver.get('volume_ml', 0):.0f} mL   tumors {len(findings.get('tumors', []))}   "
                "image left = patient right")
    x = 4
    for label in classes[1:]:
        draw.rectangle((x, PANEL + 22, x + 12, PANEL + 34), fill=label.color)
        draw.text((x + 16, PANEL + 22), label.display, fill=(230, 230, 230))
        x += 16 + 8 * len(label.display) + 12
    draw.text((x + 10, PANEL + 22), text, fill=(230, 230, 230))
    status = findings.get("status")
    if status:  # what was decided, and why: in orange where nothing is reported
        line = f"{'reported' if status['reported'] else 'NOTHING REPORTED'} ({status['code']}): {status['reason']}"
        colour = (230, 230, 230) if status["reported"] else (255, 160, 40)
        draw.text((4, PANEL + 40), line[: out.width // 6], fill=colour)
    return out


def write_preview(path: Path, ct: np.ndarray, labels: np.ndarray, spacing: Sequence[float], findings: dict[str, Any],
                  classes: Sequence[Label] = SPEC.labels) -> None:
    """Render and save the montage as PNG."""
    render_preview(ct, labels, spacing, findings, classes).save(path, format="PNG")
