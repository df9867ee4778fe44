"""CSV manifests, the shared decode -> convert -> collect pipeline, and the image_csv source.

Every file-based source (image_csv, dicom, nifti) is a list of ``Record`` s (a file and, when it
came from a manifest, its row) plus a ``decode`` function for one file. ``assemble`` runs them
all, so the on_error policy, label mapping and error wording are the same for every format: in
``raise`` mode all bad files are collected first and reported together (one fix-up pass for the
user, not one per run); in ``skip`` mode each is logged and counted.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medfed.data.sources.errors import DataError, where
from medfed.data.sources.image import LoadedData, convert_images, convert_masks
from medfed.data.sources.options import ImageCsvSource, ImageOptions, OnError, Split

log = logging.getLogger("medfed")

RESERVED = ("path", "label", "patient_id", "split", "mask_path")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_MAX_LISTED = 20  # bad files named in one DataError message


@dataclass(frozen=True)
class Row:
    """One manifest row: its spreadsheet row number (header = 1) and its cells."""

    file: Path
    number: int
    cells: dict[str, str]

    def get(self, column: str) -> str | None:
        value = (self.cells.get(column) or "").strip()
        return value or None

    def at(self, column: str | None = None) -> str:
        return where(self.file, self.number, column)


@dataclass(frozen=True)
class Record:
    """A file to decode, and its manifest row when there is one."""

    path: Path
    row: Row | None = None
    mask_path: Path | None = None

    @property
    def at(self) -> str:
        return self.row.at() if self.row is not None else str(self.path)


@dataclass(frozen=True)
class Decoded:
    """A decoded file: one or more frames (slices), native dtype, with optional masks."""

    frames: list[np.ndarray]
    suffixes: list[str] = field(default_factory=lambda: [""])
    masks: list[np.ndarray] | None = None
    case_id: str | None = None  # e.g. SOPInstanceUID; default: the path
    patient_id: str | None = None
    display_range: tuple[float, float] | None = None
    info: dict[str, str] = field(default_factory=dict)  # dtype, bits... for `data check`


def read_manifest(path: Path, *, required: Sequence[str]) -> list[Row]:
    """All rows of a CSV manifest; a missing file, bad encoding or missing column is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [
                Row(
                    path,
                    i + 2,
                    {
                        k.strip(): v
                        for k, v in r.items()
                        if isinstance(k, str) and isinstance(v, str)
                    },
                )  # fmt: skip
                for i, r in enumerate(reader)
            ]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    if not columns:
        raise DataError(f"{path}: empty manifest (no header row)")
    for col in required:
        if col not in columns:
            raise DataError(f"{where(path, column=col)}: required column missing "
                            f"(columns: {', '.join(columns)})")  # fmt: skip
    return rows


def resolve(row: Row, column: str, root: Path) -> Path | None:
    value = row.get(column)
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() else root / p


def manifest_records(rows: Iterable[Row], root: Path) -> list[Record]:
    """Records of manifest rows; a row without a path is kept (and reported when decoded)."""
    return [Record(resolve(r, "path", root) or Path(""), r, resolve(r, "mask_path", root))
            for r in rows]  # fmt: skip


def _int_like(values: Iterable[str]) -> bool:
    try:
        return all(int(v) >= 0 for v in values)
    except ValueError:
        return False


def label_names(values: Iterable[str], classes: Sequence[str] | None = None) -> tuple[str, ...]:
    """Class order: ``classes`` if given; non-negative integer labels keep their value; otherwise
    strings in sorted order (so the same label set gives the same indices at every site)."""
    if classes is not None:
        return tuple(classes)
    uniq = set(values)
    if uniq and _int_like(uniq):
        return tuple(str(i) for i in range(max(int(v) for v in uniq) + 1))
    return tuple(sorted(uniq))


def _canon(label: str) -> str:
    """'01' and '1' are the same integer label."""
    return str(int(label)) if _int_like([label]) else label


class Collector:
    """Accumulates converted cases and bad files; ``finish`` applies the on_error policy."""

    def __init__(self, *, source: str, on_error: OnError, classes: Sequence[str] | None) -> None:
        self.source, self.on_error, self.classes = source, on_error, classes
        self.images: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []
        self.labels: list[str] = []
        self.case_ids: list[str] = []
        self.patients: list[str] = []
        self.splits: list[str | None] = []
        self.meta: list[dict[str, str]] = []
        self.bad: list[tuple[str, str]] = []

    def fail(self, file: str, reason: str) -> None:
        if self.on_error == OnError.SKIP:
            log.warning("skipping %s: %s", file, reason)
        self.bad.append((file, reason))

    def check_label(self, label: str | None, row: Row | None, file: str) -> str | None:
        """The label if usable, else records why not and returns None."""
        at = row.at("label") if row is not None else file
        if label is None:
            self.fail(at, "no label")
            return None
        label = label if self.classes is not None else _canon(label)
        if self.classes is not None and label not in self.classes:
            self.fail(at, f"unknown label value {label!r} (classes: {list(self.classes)})")
            return None
        return label

    def check_split(self, row: Row) -> tuple[bool, str | None]:
        """(usable, lower-cased split or None); an unknown value is recorded as a bad row."""
        split = row.get("split")
        if split is None:
            return True, None
        if split.lower() not in {s.value for s in Split}:
            self.fail(row.at("split"), f"unknown split value {split!r} (train, val or test)")
            return False, None
        return True, split.lower()

    def finish(self) -> LoadedData:
        if self.bad and self.on_error == OnError.RAISE:
            listed = "\n  ".join(f"{f}: {r}" for f, r in self.bad[:_MAX_LISTED])
            more = len(self.bad) - _MAX_LISTED
            raise DataError(f"{self.source}: {len(self.bad)} bad file(s) (on_error=raise):\n  "
                            f"{listed}" + (f"\n  ... and {more} more" if more > 0 else ""))  # fmt: skip
        if not self.images:
            raise DataError(f"{self.source}: no images could be loaded"
                            + (f" ({len(self.bad)} skipped)" if self.bad else ""))  # fmt: skip
        names = label_names(self.labels, self.classes)
        index = {n: i for i, n in enumerate(names)}
        have = [m is not None for m in self.masks]
        if any(have) and not all(have):
            raise DataError(f"{self.source}: masks are given for some cases but not all")
        keys = sorted({k for m in self.meta for k in m})
        has_split = any(s is not None for s in self.splits)
        return LoadedData(
            images=torch.stack(self.images),
            labels=torch.tensor([index[v] for v in self.labels], dtype=torch.int64),
            case_ids=tuple(self.case_ids),
            patient_ids=tuple(self.patients),
            label_names=names,
            masks=torch.stack([m for m in self.masks if m is not None]) if all(have) else None,
            split=tuple(self.splits) if has_split else None,
            metadata={k: tuple(m.get(k, "") for m in self.meta) for k in keys},
            skipped=tuple(self.bad),
            source=self.source,
        )


def assemble(
    records: Sequence[Record],
    decode: Callable[[Record], Decoded],
    *,
    image: ImageOptions,
    on_error: OnError,
    classes: Sequence[str] | None,
    source: str,
    case_id: Callable[[Record, Decoded], str],
    lookup: Callable[[Record, Decoded], Row | None] | None = None,
) -> LoadedData:
    """Decode, label and convert every record; see the module docstring for the error policy.

    ``lookup`` finds the labelling row of a file whose label lives elsewhere (a DICOM labels CSV
    keyed by SOPInstanceUID); by default the record's own manifest row labels it.
    """
    out = Collector(source=source, on_error=on_error, classes=classes)
    for rec in records:
        try:
            dec = decode(rec)
            row = lookup(rec, dec) if lookup is not None else rec.row
            if row is None:
                out.fail(
                    rec.at, "no label for this file" + (f" ({dec.case_id})" if dec.case_id else "")
                )
                continue
            label = out.check_label(row.get("label"), row, str(rec.path))
            if label is None:
                continue
            ok, split = out.check_split(row)
            if not ok:
                continue
            images = convert_images(dec.frames, image, source=str(rec.path),
                                    display_range=dec.display_range)  # fmt: skip
            masks = None if dec.masks is None else convert_masks(np.stack(dec.masks), image,
                                                                source=str(rec.mask_path))  # fmt: skip
        except DataError as err:
            out.fail(rec.at, str(err))
            continue
        cid = case_id(rec, dec)
        patient = row.get("patient_id") or dec.patient_id or cid
        meta = {k: v for k, v in row.cells.items() if k not in RESERVED and isinstance(v, str)}
        for k, suffix in enumerate(dec.suffixes):
            out.images.append(images[k])
            out.masks.append(None if masks is None else masks[k])
            out.labels.append(label)
            out.case_ids.append(cid + suffix)
            out.patients.append(patient)
            out.splits.append(split)
            out.meta.append(meta)
    return out.finish()


# --------------------------------------------------------------------------------------------
# Pillow images


def read_pillow(path: Path, *, mask: bool = False) -> np.ndarray:
    """A PNG / JPEG / TIFF / BMP as a numpy array in its native depth (16-bit stays 16-bit).

    ``load()`` forces the full decode here, so a truncated file fails now with its name, not
    later inside torch. Palette and exotic modes become RGB(A); multi-page TIFFs give page 1.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as opened:
            opened.load()
            im: Image.Image = opened
            if im.mode == "1":
                im = im.convert("L")
            elif im.mode in ("P", "PA"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            elif im.mode not in ("L", "LA", "RGB", "RGBA", "I", "F") and not im.mode.startswith(
                "I;16"
            ):
                im = im.convert("RGB")
            if mask and im.mode in ("RGB", "RGBA", "LA"):
                im = im.convert("L")
            arr = np.array(im)
    except DataError:
        raise
    except Exception as err:  # any decoder failure (truncated, corrupt, bomb) is a bad file
        raise DataError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
    return arr


def _decode_pillow(rec: Record) -> Decoded:
    if rec.row is not None and rec.row.get("path") is None:
        raise DataError(f"{rec.row.at('path')}: empty path")
    if not rec.path.is_file():
        raise DataError(f"{rec.path}: file not found")
    arr = read_pillow(rec.path)
    masks = None
    if rec.mask_path is not None:
        m = read_pillow(rec.mask_path, mask=True)
        if m.shape[:2] != arr.shape[:2]:
            raise DataError(f"{rec.mask_path}: mask is {m.shape[:2]} but image is {arr.shape[:2]}")
        masks = [m]
    return Decoded([arr], masks=masks, info={"dtype": str(arr.dtype)})


def load_image_csv(
    spec: ImageCsvSource, *, image: ImageOptions, on_error: OnError = OnError.RAISE
) -> LoadedData:
    """Images listed in a CSV manifest; case ids are the manifest's paths."""
    rows = read_manifest(spec.manifest, required=("path", "label"))
    root = spec.root if spec.root is not None else spec.manifest.parent
    return assemble(
        manifest_records(rows, root),
        _decode_pillow,
        image=image,
        on_error=spec.on_error or on_error,
        classes=spec.classes,
        source=str(spec.manifest),
        case_id=lambda rec, dec: (rec.row.get("path") if rec.row else None) or str(rec.path),
    )
