"""Validated options of every real data source (what a config's site ``source:`` block holds).

Each source is a pydantic model with a ``kind`` discriminator, so a config names its source by
kind and a typo in any option is an error naming the field before anything is read from disk.
The base class mirrors ``medfed.config._Section`` (extra="forbid", frozen); it is defined here
rather than imported because ``medfed.config`` will import these models, and importing it back
would be a cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medfed.types import StrEnum


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceKind(StrEnum):
    IMAGE_CSV = "image_csv"
    DICOM = "dicom"
    NIFTI = "nifti"
    MEDMNIST = "medmnist"


class OnError(StrEnum):
    """``raise``: any bad file fails loading (before training) listing every bad file.
    ``skip``: bad files are logged, counted in ``LoadedData.skipped`` and left out."""

    RAISE = "raise"
    SKIP = "skip"


class ResizeMode(StrEnum):
    PAD = "pad"  # keep aspect ratio, zero-pad to a square
    CROP = "crop"  # resize the short side to ``size``, then center-crop
    STRETCH = "stretch"  # resize both sides to ``size`` (distorts the aspect ratio)


class Intensity(StrEnum):
    MINMAX = "minmax"  # per image: min -> 0, max -> 255
    PERCENTILE = "percentile"  # per image: percentiles[0] -> 0, percentiles[1] -> 255, clipped
    WINDOW = "window"  # fixed: center - width/2 -> 0, center + width/2 -> 255, clipped
    NONE = "none"  # values used as they are, clipped to [0, 255]


class Split(StrEnum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class ImageOptions(_Section):
    """How every image becomes uint8 (C, size, size), whatever its depth, colour or shape."""

    size: int = Field(64, ge=1, le=4096)
    resize: ResizeMode = ResizeMode.PAD
    channels: Literal[1, 3] = 1
    intensity: Intensity = Intensity.MINMAX
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] | None = Field(
        None, description="(center, width) in the image's (modality, e.g. HU) units"
    )

    @model_validator(mode="after")
    def _check(self) -> ImageOptions:
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(
                f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}"
            )
        if self.intensity == Intensity.WINDOW and self.window is None:
            raise ValueError("intensity 'window' needs window: [center, width]")
        if self.window is not None and self.window[1] <= 0:
            raise ValueError(f"window width must be positive, got {self.window[1]}")
        return self


class _SourceBase(_Section):
    on_error: OnError | None = Field(
        None, description="raise | skip; unset = the data section's on_error (default raise)"
    )
    classes: list[str] | None = Field(
        None,
        description="label values in class-index order (e.g. [benign, malignant]); unset = "
        "integer labels as they are, string labels in sorted order",
    )


class ImageCsvSource(_SourceBase):
    """PNG / JPEG / TIFF / BMP files listed in a CSV (columns path, label [, site, patient_id,
    split, mask_path, any metadata]); paths are relative to ``root`` or the manifest's folder."""

    kind: Literal[SourceKind.IMAGE_CSV] = SourceKind.IMAGE_CSV
    manifest: Path
    root: Path | None = None


class DicomKey(StrEnum):
    SOP_INSTANCE_UID = "sop_instance_uid"
    PATH = "path"


class DicomSource(_SourceBase):
    """DICOM files: one file, a folder (recursive) or a CSV manifest with a ``path`` column.

    For a file or folder, labels come from ``labels_csv`` keyed by SOPInstanceUID or by path
    (relative to the labels CSV's folder). ``voi``: apply the file's own VOI LUT / window (the
    display the modality intended) unless ImageOptions asks for an explicit window.
    """

    kind: Literal[SourceKind.DICOM] = SourceKind.DICOM
    path: Path
    root: Path | None = None
    labels_csv: Path | None = None
    key: DicomKey = DicomKey.SOP_INSTANCE_UID
    frame: int | Literal["all"] = Field(
        0, description="frame of a multi-frame file; 'all' = one case per frame"
    )
    voi: bool = True

    @model_validator(mode="after")
    def _check(self) -> DicomSource:
        if isinstance(self.frame, int) and self.frame < 0:
            raise ValueError(f"frame must be >= 0 or 'all', got {self.frame}")
        return self


class NiftiMode(StrEnum):
    SLICES = "slices"
    VOLUME = "volume"


class NiftiSource(_SourceBase):
    """NIfTI volumes listed in a CSV (path, label [, mask_path, patient_id, split, ...]).

    Every volume is first reoriented to the closest canonical (RAS+) orientation, so ``axis``
    means the same anatomical direction at every site (0 = sagittal, 1 = coronal, 2 = axial).

    ``slices``: every ``every_k``-th slice along ``axis`` within ``slice_range`` [start, stop)
    becomes a 2-D case (``<path>#<k>``), with its mask slice; ``ImageOptions`` size it.

    ``volume``: each row is one 3-D case (its manifest path), resampled to ``volume_size``
    (D, H, W) with D = ``axis`` and H, W the other two RAS axes in order, so ``volume[d]`` is
    slice mode's slice ``d`` before resizing. ImageOptions' intensity / channels rules apply per
    volume; its size / resize do not.
    """

    kind: Literal[SourceKind.NIFTI] = SourceKind.NIFTI
    manifest: Path
    root: Path | None = None
    mode: NiftiMode = NiftiMode.SLICES
    axis: Literal[0, 1, 2] = 2
    slice_range: tuple[int, int] | None = Field(
        None, description="slices mode: [start, stop) along axis; unset = all slices"
    )
    every_k: int = Field(1, ge=1, description="slices mode: keep every k-th slice")
    volume_size: tuple[int, int, int] = Field(
        (32, 64, 64),
        description="volume mode: (D, H, W) every volume is resampled to, each axis on its own "
        "(trilinear image, nearest-neighbour mask; voxel spacing is not used). D runs along "
        "``axis`` of the RAS-reoriented volume, H and W are the remaining two axes in order "
        "(axis 2: D = z inferior->superior, H = x left->right, W = y posterior->anterior)",
    )

    @model_validator(mode="after")
    def _check(self) -> NiftiSource:
        if self.slice_range is not None and not 0 <= self.slice_range[0] < self.slice_range[1]:
            raise ValueError(f"slice_range must be [start, stop) with 0 <= start < stop, got "
                             f"{self.slice_range}")  # fmt: skip
        if any(s < 1 for s in self.volume_size):
            raise ValueError(f"volume_size must be three positive sizes (D, H, W), got "
                             f"{self.volume_size}")  # fmt: skip
        if self.mode == NiftiMode.VOLUME and (self.slice_range is not None or self.every_k != 1):
            raise ValueError("slice_range and every_k apply to mode 'slices' only; mode "
                             "'volume' keeps the whole volume (resampled to volume_size)")  # fmt: skip
        if self.mode == NiftiMode.SLICES and "volume_size" in self.model_fields_set:
            raise ValueError("volume_size applies to mode 'volume' only; slices are sized by "
                             "the image options (size, resize)")  # fmt: skip
        return self


class MedMnistSource(_SourceBase):
    """A local MedMNIST ``.npz`` (train/val/test _images and _labels); never downloaded."""

    kind: Literal[SourceKind.MEDMNIST] = SourceKind.MEDMNIST
    path: Path
    use: list[Split] = Field(default_factory=lambda: [Split.TRAIN, Split.VAL])
    label_column: int | None = Field(
        None, ge=0, description="column of a multi-label (N, k) label array to use"
    )

    @model_validator(mode="after")
    def _check(self) -> MedMnistSource:
        if not self.use or len(set(self.use)) != len(self.use):
            raise ValueError(f"use must list distinct splits, got {[str(u) for u in self.use]}")
        return self


SourceSpec = Annotated[
    ImageCsvSource | DicomSource | NiftiSource | MedMnistSource, Field(discriminator="kind")
]
