"""``medfed data check SOURCE``: audit a data source before anyone trains on it.

A loader stops at bad data; a check keeps going and lists *everything* wrong at once (unreadable
or truncated files, files missing from disk or from the manifest, unknown labels, duplicates,
patients in more than one split) together with what the data looks like (class counts, image
sizes, channels, bit depths). It never raises DataError for a bad file: each becomes a Finding.
Errors make ``report.ok`` false (the CLI exits non-zero); warnings are worth a look.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter
from rich.console import Console
from rich.table import Table

from medfed.data.sources.dicom import decode_dicom, dicom_records, is_dicom_file, label_lookup
from medfed.data.sources.errors import DataError
from medfed.data.sources.medmnist import read_npz
from medfed.data.sources.nifti import NIFTI_SUFFIXES, read_volume
from medfed.data.sources.options import (
    DicomKey,
    DicomSource,
    ImageCsvSource,
    MedMnistSource,
    NiftiSource,
    SourceKind,
    SourceSpec,
    Split,
)
from medfed.data.sources.table import IMAGE_SUFFIXES, Record, Row, read_manifest, read_pillow
from medfed.types import StrEnum


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


class FindingKind(StrEnum):
    BAD_MANIFEST = "bad_manifest"
    MISSING_FILE = "missing_file"
    UNREADABLE = "unreadable"
    NO_LABEL = "no_label"
    UNKNOWN_LABEL = "unknown_label"
    BAD_SPLIT = "bad_split"
    DUPLICATE = "duplicate"
    LEAKAGE = "patient_leakage"
    NOT_IN_MANIFEST = "not_in_manifest"


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    severity: Severity
    file: str
    message: str
    row: int | None = None


@dataclass(frozen=True)
class CheckReport:
    source: str
    kind: str
    n_files: int = 0
    n_readable: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # "HxW" (or "DxHxW") -> count
    channels: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)  # bit depth / pixel type
    findings: tuple[Finding, ...] = ()

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == Severity.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == Severity.WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors


class _Audit:
    """Mutable accumulator behind one CheckReport."""

    def __init__(self, source: str, kind: str, classes: list[str] | None) -> None:
        self.source, self.kind, self.classes = source, kind, classes
        self.findings: list[Finding] = []
        self.n_files = self.n_readable = 0
        self.labels: Counter[str] = Counter()
        self.sizes: Counter[str] = Counter()
        self.channels: Counter[str] = Counter()
        self.dtypes: Counter[str] = Counter()
        self.hashes: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        self.patients: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))

    def add(self, kind: FindingKind, file: str | Path, message: str, *, row: int | None = None,
            severity: Severity = Severity.ERROR) -> None:  # fmt: skip
        self.findings.append(Finding(kind, severity, str(file), message, row))

    def shape(self, arr: np.ndarray, dtype: str, *, volume: bool = False) -> None:
        self.n_readable += 1
        dims = arr.shape if volume else arr.shape[:2]
        self.sizes["x".join(map(str, dims))] += 1
        self.channels[str(1 if volume or arr.ndim == 2 else arr.shape[2])] += 1
        self.dtypes[dtype] += 1

    def labelled(self, row: Row, file: str, where: str) -> None:
        """Label, split and patient bookkeeping of one manifest (or labels CSV) row."""
        label = row.get("label")
        if label is None:
            self.add(FindingKind.NO_LABEL, row.file, "empty label", row=row.number)
        elif self.classes is not None and label not in self.classes:
            self.add(FindingKind.UNKNOWN_LABEL, row.file,
                     f"unknown label value {label!r} (classes: {self.classes})", row=row.number)  # fmt: skip
        else:
            self.labels[label] += 1
        split = row.get("split")
        if split is not None and split.lower() not in {s.value for s in Split}:
            self.add(FindingKind.BAD_SPLIT, row.file, f"unknown split value {split!r}",
                     row=row.number)  # fmt: skip
        elif split is not None:
            self.patients[row.get("patient_id") or file][split.lower()].append(where)

    def digest(self, path: Path, split: str | None) -> None:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        self.hashes[h.hexdigest()].append((str(path), split))

    def finish(self) -> CheckReport:
        for files in self.hashes.values():
            if len(files) > 1:
                names = [f for f, _ in files]
                sides = {s for _, s in files if s is not None}
                self.add(FindingKind.DUPLICATE, names[0],
                         f"identical bytes in {len(names)} files: {', '.join(names[:5])}"
                         + (" ..." if len(names) > 5 else "")
                         + (f" (across splits {sorted(sides)})" if len(sides) > 1 else ""),
                         severity=Severity.ERROR if len(sides) > 1 else Severity.WARNING)  # fmt: skip
        for patient, splits in sorted(self.patients.items()):
            if len(splits) > 1:
                detail = "; ".join(f"{s}: {', '.join(w[:3])}" for s, w in sorted(splits.items()))
                self.add(FindingKind.LEAKAGE, self.source,
                         f"patient {patient!r} is in splits {sorted(splits)} ({detail})")  # fmt: skip
        return CheckReport(self.source, self.kind, self.n_files, self.n_readable,
                           dict(sorted(self.labels.items())), dict(self.sizes.most_common()),
                           dict(self.channels.most_common()), dict(self.dtypes.most_common()),
                           tuple(self.findings))  # fmt: skip


def _manifest(
    audit: _Audit, manifest: Path, root: Path | None, suffixes: tuple[str, ...],
    read: Callable[[Path], tuple[np.ndarray, str]], *, volume: bool = False,
) -> None:  # fmt: skip
    """Check a manifest-based source: every row's file, mask, label, split, then the folder."""
    try:
        rows = read_manifest(manifest, required=("path", "label"))
    except DataError as err:
        audit.add(FindingKind.BAD_MANIFEST, manifest, str(err))
        return
    base = root if root is not None else manifest.parent
    listed: set[Path] = set()
    for row in rows:
        audit.n_files += 1
        rel = row.get("path")
        if rel is None:
            audit.add(FindingKind.MISSING_FILE, manifest, "empty path", row=row.number)
            continue
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        listed.add(path.resolve())
        audit.labelled(row, str(path), f"row {row.number}")
        for p, what in [(path, "image")] + [
            (base / m, "mask") for m in [row.get("mask_path")] if m
        ]:
            listed.add(p.resolve())
            if not p.is_file():
                audit.add(FindingKind.MISSING_FILE, manifest, f"{what} file not found: {p}",
                          row=row.number)  # fmt: skip
                continue
            try:
                arr, dtype = read(p)
            except DataError as err:
                audit.add(FindingKind.UNREADABLE, p, str(err), row=row.number)
                continue
            if what == "image":
                audit.digest(p, (row.get("split") or "").lower() or None)
                audit.shape(arr, dtype, volume=volume)
    for p in sorted(base.rglob("*")):
        name = p.name.lower()
        if p.is_file() and name.endswith(suffixes) and p.resolve() not in listed:
            audit.add(FindingKind.NOT_IN_MANIFEST, p, "on disk but not in the manifest",
                      severity=Severity.WARNING)  # fmt: skip


def _pillow(p: Path) -> tuple[np.ndarray, str]:
    arr = read_pillow(p)
    return arr, str(arr.dtype)


def _nifti(p: Path) -> tuple[np.ndarray, str]:
    return read_volume(p), "float32"


def _dicom(p: Path) -> tuple[np.ndarray, str]:
    dec = decode_dicom(p, frame=0, voi=False)
    return dec.frames[0], f"{dec.info['dtype']} ({dec.info['bits']} bits stored)"


def _check_dicom(audit: _Audit, spec: DicomSource) -> None:
    if spec.path.suffix.lower() == ".csv":
        _manifest(audit, spec.path, spec.root, (".dcm",), _dicom)
        return
    try:
        records, _ = dicom_records(spec)
        table = label_lookup(spec) if spec.labels_csv is not None else None
    except DataError as err:
        audit.add(FindingKind.BAD_MANIFEST, spec.labels_csv or spec.path, str(err))
        return
    if table is None:
        audit.add(FindingKind.NO_LABEL, spec.path, "no labels_csv: files are unlabelled",
                  severity=Severity.WARNING)  # fmt: skip
    for rec in records:
        audit.n_files += 1
        try:
            dec = decode_dicom(rec.path, frame=0, voi=False)
        except DataError as err:
            audit.add(FindingKind.UNREADABLE, rec.path, str(err))
            continue
        audit.shape(dec.frames[0], f"{dec.info['dtype']} ({dec.info['bits']} bits stored)")
        row = _dicom_row(table, spec, rec, dec.case_id)
        if table is not None and row is None:
            audit.add(FindingKind.NO_LABEL, rec.path, f"not in {spec.labels_csv}")
        split = row.get("split") if row is not None else None
        audit.digest(rec.path, split.lower() if split else None)
        if row is not None:
            patient = row.get("patient_id") or dec.patient_id or str(rec.path)
            audit.labelled(Row(row.file, row.number, {**row.cells, "patient_id": patient}),
                           str(rec.path), str(rec.path))  # fmt: skip


def _dicom_row(
    table: dict[str, Row] | None, spec: DicomSource, rec: Record, uid: str | None
) -> Row | None:
    if table is None:
        return None
    key = uid if spec.key == DicomKey.SOP_INSTANCE_UID else str(rec.path.resolve())
    return table.get(key or "")


def _check_medmnist(audit: _Audit, spec: MedMnistSource) -> None:
    try:
        arrays = read_npz(spec.path, list(spec.use))
    except DataError as err:
        audit.add(FindingKind.UNREADABLE, spec.path, str(err))
        return
    audit.n_files = 1
    for split, (x, y) in arrays.items():
        if x.ndim < 3 or len(x) != len(y):
            audit.add(FindingKind.UNREADABLE, spec.path,
                      f"{split}: images {x.shape} do not match labels {y.shape}")  # fmt: skip
            continue
        for img in x:
            audit.shape(img, str(x.dtype))
            audit.hashes[hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()].append(
                (f"{spec.path}:{split}", str(split))
            )
        flat = y.reshape(len(y), -1)
        if flat.shape[1] > 1 and spec.label_column is None:
            audit.add(FindingKind.NO_LABEL, spec.path,
                      f"{split}: multi-label ({flat.shape[1]} columns); set label_column")  # fmt: skip
            continue
        column = flat[:, spec.label_column or 0]
        audit.labels.update(str(int(v)) for v in column)
        if spec.classes is not None:
            bad = sorted({int(v) for v in column if int(v) >= len(spec.classes)})
            if bad:
                audit.add(FindingKind.UNKNOWN_LABEL, spec.path, f"{split}: labels {bad} "
                          f"beyond classes {spec.classes}")  # fmt: skip
    audit.n_readable = sum(audit.sizes.values())


def check_source(spec: SourceSpec | Path | str, *, kind: str | None = None) -> CheckReport:
    """Audit a source (a spec, or a path whose kind is guessed by ``source_from_path``)."""
    if isinstance(spec, str | Path):
        try:
            spec = source_from_path(Path(spec), kind=kind)
        except DataError as err:
            return CheckReport(str(spec), kind or "?", findings=(
                Finding(FindingKind.BAD_MANIFEST, Severity.ERROR, str(spec), str(err)),))  # fmt: skip
    audit = _Audit(str(getattr(spec, "manifest", None) or getattr(spec, "path", "")),
                   str(spec.kind), spec.classes)  # fmt: skip
    if isinstance(spec, ImageCsvSource):
        _manifest(audit, spec.manifest, spec.root, IMAGE_SUFFIXES, _pillow)
    elif isinstance(spec, NiftiSource):
        _manifest(audit, spec.manifest, spec.root, NIFTI_SUFFIXES, _nifti, volume=True)
    elif isinstance(spec, DicomSource):
        _check_dicom(audit, spec)
    else:
        _check_medmnist(audit, spec)
    return audit.finish()


def source_from_path(path: Path, *, kind: str | None = None) -> SourceSpec:
    """A default SourceSpec for a path: ``.csv`` -> image_csv (dicom / nifti when its paths end
    in .dcm / .nii[.gz]), ``.npz`` -> medmnist, a ``.dcm`` file or a folder of DICOM -> dicom."""
    if kind is None:
        kind = _guess_kind(path)
    adapter: TypeAdapter[SourceSpec] = TypeAdapter(SourceSpec)
    field_name = "manifest" if kind in (SourceKind.IMAGE_CSV, SourceKind.NIFTI) else "path"
    try:
        return adapter.validate_python({"kind": kind, field_name: path})
    except ValueError as err:
        raise DataError(f"{path}: cannot use as a {kind!r} source: {err}") from None


def _guess_kind(path: Path) -> SourceKind:
    name = path.name.lower()
    if path.is_dir():
        if any(is_dicom_file(p) for p in path.rglob("*") if p.is_file()):
            return SourceKind.DICOM
        raise DataError(f"{path}: folder holds no DICOM files; give a manifest CSV instead")
    if name.endswith(".npz"):
        return SourceKind.MEDMNIST
    if name.endswith(".dcm"):
        return SourceKind.DICOM
    if name.endswith(".csv"):
        try:
            with path.open(newline="", encoding="utf-8-sig") as fh:
                paths = [
                    r.get("path") or "" for _, r in zip(range(50), csv.DictReader(fh), strict=False)
                ]
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{path}: not a readable CSV file ({err})") from None
        if paths and all(p.lower().endswith(".dcm") for p in paths):
            return SourceKind.DICOM
        if paths and all(p.lower().endswith(NIFTI_SUFFIXES) for p in paths):
            return SourceKind.NIFTI
        return SourceKind.IMAGE_CSV
    raise DataError(f"{path}: cannot guess the source kind; pass kind explicitly")


def to_json(report: CheckReport) -> dict[str, Any]:
    out = asdict(report)
    out["ok"] = report.ok
    out["findings"] = [{**asdict(f), "kind": str(f.kind), "severity": str(f.severity)}
                       for f in report.findings]  # fmt: skip
    return out


def from_json(data: dict[str, Any]) -> CheckReport:
    fields = {k: v for k, v in data.items() if k not in ("ok", "findings")}
    findings = tuple(Finding(FindingKind(f["kind"]), Severity(f["severity"]), f["file"],
                             f["message"], f["row"]) for f in data["findings"])  # fmt: skip
    return CheckReport(**fields, findings=findings)


def render(report: CheckReport, console: Console) -> None:
    """A summary table and, when there are any, a findings table."""
    summary = Table(title=f"{report.kind}: {report.source}", show_header=False)
    summary.add_row("files", f"{report.n_readable} readable of {report.n_files}")
    for name, counts in [("classes", report.class_counts), ("sizes", report.sizes),
                         ("channels", report.channels), ("pixel types", report.dtypes)]:  # fmt: skip
        summary.add_row(name, ", ".join(f"{k}: {v}" for k, v in list(counts.items())[:8]) or "-")
    status = "[green]OK[/]" if report.ok else f"[red]{len(report.errors)} error(s)[/]"
    summary.add_row("status", f"{status}, {len(report.warnings)} warning(s)")
    console.print(summary)
    if report.findings:
        table = Table(title="findings")
        for col in ("severity", "kind", "file", "row", "message"):
            table.add_column(col, overflow="fold")
        for f in report.findings:
            style = "red" if f.severity == Severity.ERROR else "yellow"
            table.add_row(f"[{style}]{f.severity}[/]", str(f.kind), f.file,
                          "" if f.row is None else str(f.row), f.message)  # fmt: skip
        console.print(table)
