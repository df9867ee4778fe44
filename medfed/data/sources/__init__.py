"""Real data sources (image folders + CSV, DICOM, NIfTI, MedMNIST) usable as federation sites.

Loaders raise only ``DataError`` for bad data; ``build_files_federation`` turns a
``FilesDataConfig`` into a Federation, ``medfed.data.check`` audits a source without loading it.
"""

from medfed.data.sources.errors import DataError
from medfed.data.sources.federation import (
    FilesDataConfig,
    LoadReport,
    PartitionSpec,
    SiteReport,
    SiteSpec,
    build_files_federation,
    load_source,
)
from medfed.data.sources.image import LoadedData
from medfed.data.sources.options import (
    DicomSource,
    ImageCsvSource,
    ImageOptions,
    Intensity,
    MedMnistSource,
    NiftiSource,
    OnError,
    ResizeMode,
    SourceKind,
    SourceSpec,
)

__all__ = [
    "DataError",
    "DicomSource",
    "FilesDataConfig",
    "ImageCsvSource",
    "ImageOptions",
    "Intensity",
    "LoadReport",
    "LoadedData",
    "MedMnistSource",
    "NiftiSource",
    "OnError",
    "PartitionSpec",
    "ResizeMode",
    "SiteReport",
    "SiteSpec",
    "SourceKind",
    "SourceSpec",
    "build_files_federation",
    "load_source",
]
