"""Build a Federation from real data: one source per site, or one pooled source partitioned.

Everything is loaded (and every bad file reported) before a Federation exists, so a config
pointing at a broken export fails before the first round, not in round 7. Class indices are
agreed federation-wide (a site that happens to have no malignant cases must still call benign 0).
Validation: the source's own split column when it has one, else a patient-level stratified split,
because cases of one patient in both train and val make validation optimistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from medfed.data.partition import PartitionKind, partition_by_group
from medfed.data.site import Federation, Site
from medfed.data.sources.dicom import load_dicom
from medfed.data.sources.errors import DataError
from medfed.data.sources.image import LoadedData
from medfed.data.sources.medmnist import load_medmnist
from medfed.data.sources.nifti import load_nifti
from medfed.data.sources.options import (
    DicomSource,
    ImageCsvSource,
    ImageOptions,
    MedMnistSource,
    NiftiSource,
    OnError,
    SourceSpec,
    Split,
    _Section,
)
from medfed.data.sources.table import _int_like, load_image_csv
from medfed.data.split import stratified_group_split


class SiteSpec(_Section):
    name: str = Field(min_length=1)
    source: SourceSpec


class PartitionSpec(_Section):
    kind: PartitionKind
    num_sites: int | None = Field(None, ge=1)
    alpha: float | None = Field(None, gt=0)
    column: str | None = None
    seed: int = 0


class FilesDataConfig(_Section):
    """Real sites (``sites``) or one pooled dataset split into simulated sites (``pooled`` +
    ``partition``), plus an optional validation-only ``external`` site."""

    sites: list[SiteSpec] = Field(default_factory=list)
    pooled: SourceSpec | None = None
    partition: PartitionSpec | None = None
    external: SiteSpec | None = None
    image: ImageOptions = Field(default_factory=ImageOptions)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0
    on_error: OnError = OnError.RAISE

    @model_validator(mode="after")
    def _one_layout(self) -> FilesDataConfig:
        if self.sites and (self.pooled is not None or self.partition is not None):
            raise ValueError("give either sites (real sites) or pooled + partition, not both")
        if not self.sites and (self.pooled is None or self.partition is None):
            raise ValueError("give sites (one source per site) or both pooled and partition")
        names = [s.name for s in self.sites] + ([self.external.name] if self.external else [])
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        return self


@dataclass(frozen=True)
class SiteReport:
    name: str
    role: str  # "train" or "external"
    source: str
    n_train: int
    n_val: int
    n_test: int
    class_counts: dict[str, int]
    skipped: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class LoadReport:
    label_names: tuple[str, ...]
    sites: tuple[SiteReport, ...]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        seen: dict[tuple[str, str], None] = {}
        for s in self.sites:
            seen.update(dict.fromkeys(s.skipped))
        return list(seen)

    def to_json(self) -> dict[str, Any]:
        return {"label_names": list(self.label_names),
                "sites": [{**s.__dict__, "skipped": [list(x) for x in s.skipped]}
                          for s in self.sites]}  # fmt: skip


def load_source(
    spec: SourceSpec, *, image: ImageOptions, on_error: OnError = OnError.RAISE
) -> LoadedData:
    """Load any source; ``spec.on_error`` (if set) overrides ``on_error``."""
    if isinstance(spec, ImageCsvSource):
        return load_image_csv(spec, image=image, on_error=on_error)
    if isinstance(spec, DicomSource):
        return load_dicom(spec, image=image, on_error=on_error)
    if isinstance(spec, NiftiSource):
        return load_nifti(spec, image=image, on_error=on_error)
    if isinstance(spec, MedMnistSource):
        return load_medmnist(spec, image=image, on_error=on_error)
    raise TypeError(f"unknown source spec {type(spec).__name__}")  # pragma: no cover


def _class_order(parts: Sequence[tuple[SourceSpec, LoadedData]]) -> tuple[str, ...]:
    explicit = {tuple(s.classes) for s, _ in parts if s.classes is not None}
    if len(explicit) > 1:
        raise DataError(f"sources give different classes: {sorted(explicit)}")
    if explicit:
        return next(iter(explicit))
    names = {n for _, d in parts for n in d.label_names}
    if _int_like(names):
        return tuple(str(i) for i in range(max(int(n) for n in names) + 1))
    return tuple(sorted(names))


def split_indices(
    data: LoadedData, *, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices: the split column if present, else grouped by patient."""
    if data.split is not None:
        blank = [c for c, s in zip(data.case_ids, data.split, strict=True) if s is None]
        if blank:
            raise DataError(f"{data.source}: split column is blank for {len(blank)} case(s), "
                            f"e.g. {blank[0]!r}; fill it for every row or for none")  # fmt: skip
        col = np.asarray(data.split, dtype=object)
        return tuple(np.flatnonzero(col == s.value).astype(np.int64)  # type: ignore[return-value]
                     for s in (Split.TRAIN, Split.VAL, Split.TEST))  # fmt: skip
    train, val = stratified_group_split(data.labels.numpy(), np.asarray(data.patient_ids),
                                        val_fraction=val_fraction, seed=seed)  # fmt: skip
    return train, val, np.array([], dtype=np.int64)


def _site(
    name: str, data: LoadedData, cfg: FilesDataConfig, *, seed: int
) -> tuple[Site, SiteReport]:
    tr, va, te = split_indices(data, val_fraction=cfg.val_fraction, seed=seed)
    full = data.to_dataset()
    site = Site(name, full.subset(tr), full.subset(va), full.subset(te) if len(te) else None,
                meta={"role": "train", "source": data.source})  # fmt: skip
    return site, _report(name, "train", data, len(tr), len(va), len(te))


def _report(name: str, role: str, data: LoadedData, tr: int, va: int, te: int) -> SiteReport:
    counts = np.bincount(data.labels.numpy(), minlength=len(data.label_names))
    return SiteReport(name, role, data.source, tr, va, te,
                      {n: int(c) for n, c in zip(data.label_names, counts, strict=False)},
                      data.skipped)  # fmt: skip


def _site_seed(seed: int, name: str) -> int:
    """A split seed per site: adding a site never changes another site's split."""
    return int(np.random.SeedSequence([seed, *name.encode()]).generate_state(1)[0])


def build_files_federation(cfg: FilesDataConfig) -> tuple[Federation, LoadReport]:
    """Load every source (all errors reported before anything trains) and build the Federation."""
    opts = {"image": cfg.image, "on_error": cfg.on_error}
    specs: list[tuple[str, SourceSpec]] = [(s.name, s.source) for s in cfg.sites]
    if cfg.pooled is not None:
        specs = [("pooled", cfg.pooled)]
    if cfg.external is not None:
        specs.append((cfg.external.name, cfg.external.source))
    loaded: list[tuple[SourceSpec, LoadedData]] = []
    errors = []
    for _, spec in specs:
        try:
            loaded.append((spec, load_source(spec, **opts)))  # type: ignore[arg-type]
        except DataError as err:
            errors.append(str(err))
    if errors:
        raise DataError("\n".join(errors))
    classes = _class_order(loaded)
    data = [d.relabel(classes) for _, d in loaded]
    ext_data = data.pop() if cfg.external is not None else None

    sites: list[Site] = []
    reports: list[SiteReport] = []
    if cfg.pooled is not None:
        assert cfg.partition is not None
        sites, reports = _partitioned(data[0], cfg)
    else:
        for site_spec, d in zip(cfg.sites, data, strict=True):
            site, rep = _site(site_spec.name, d, cfg, seed=_site_seed(cfg.seed, site_spec.name))
            sites.append(site)
            reports.append(rep)
    ext = None
    if ext_data is not None and cfg.external is not None:
        full = ext_data.to_dataset()
        ext = Site(cfg.external.name, full.subset([]), full,
                   meta={"role": "external", "source": ext_data.source})  # fmt: skip
        reports.append(_report(cfg.external.name, "external", ext_data, 0, len(full), 0))
    return Federation(tuple(sites), ext), LoadReport(classes, tuple(reports))


def _partitioned(data: LoadedData, cfg: FilesDataConfig) -> tuple[list[Site], list[SiteReport]]:
    p = cfg.partition
    assert p is not None
    column = None
    if p.column is not None:
        if p.column not in data.metadata:
            raise DataError(f"{data.source}: partition column {p.column!r} not in the source "
                            f"(columns: {', '.join(data.metadata) or 'none'})")  # fmt: skip
        column = data.metadata[p.column]
    try:
        # Patients, not images, are dealt out: a patient's cases stay at one simulated site.
        parts = partition_by_group(p.kind, labels=data.labels.numpy(), groups=data.patient_ids,
                                   num_sites=p.num_sites, alpha=p.alpha, column=column,
                                   seed=p.seed)  # fmt: skip
    except ValueError as err:
        raise DataError(f"{data.source}: partition {p.kind}: {err}") from None
    sites, reports = [], []
    for name, idx in parts.items():
        site, rep = _site(name, data.subset(idx), cfg, seed=_site_seed(cfg.seed, name))
        sites.append(site)
        reports.append(rep)
    return sites, reports
