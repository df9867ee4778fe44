"""Sites and federations.

Images are kept as uint8 tensors, (N, C, H, W) or volumes (N, C, D, H, W): compact, exact, and
converted to float per batch. Masks are (N, H, W) or (N, D, H, W) label maps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medfed.data.split import stratified_split
from medfed.types import Task


@dataclass(frozen=True)
class ArrayDataset:
    images: torch.Tensor  # uint8 (N, C, H, W) or (N, C, D, H, W)
    labels: torch.Tensor  # int64 (N,)
    masks: torch.Tensor | None = None  # uint8 (N, H, W) or (N, D, H, W), segmentation truth
    case_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.ndim not in (4, 5):
            raise ValueError(
                "images must be (N, C, H, W) or volumes (N, C, D, H, W), got shape "
                f"{tuple(self.images.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if self.masks is not None and (
            self.masks.shape[0] != self.images.shape[0]
            or tuple(self.masks.shape[1:]) != tuple(self.images.shape[2:])
        ):
            raise ValueError(
                f"masks {tuple(self.masks.shape)} do not match images {tuple(self.images.shape)}: "
                "one label map per image, of the image's spatial size"
            )
        if self.case_ids and len(self.case_ids) != len(self.labels):
            raise ValueError("case_ids must have one entry per image")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray | Sequence[int]) -> ArrayDataset:
        index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return ArrayDataset(
            images=self.images[index],
            labels=self.labels[index],
            masks=None if self.masks is None else self.masks[index],
            case_ids=tuple(self.case_ids[i] for i in index.tolist()) if self.case_ids else (),
        )

    @staticmethod
    def concat(parts: Sequence[ArrayDataset]) -> ArrayDataset:
        if not parts:
            raise ValueError("nothing to concatenate")
        masks = [p.masks for p in parts if p.masks is not None]
        return ArrayDataset(
            images=torch.cat([p.images for p in parts]),
            labels=torch.cat([p.labels for p in parts]),
            masks=torch.cat(masks) if len(masks) == len(parts) else None,
            case_ids=tuple(c for p in parts for c in p.case_ids)
            if all(p.case_ids for p in parts)
            else (),
        )

    @staticmethod
    def from_npy(images: str | Path, labels: str | Path, *, mmap: bool = True) -> ArrayDataset:
        """A dataset over ``.npy`` files; with ``mmap`` the images stay on disk.

        A memory-mapped array is read page by page as batches touch it, so a federation larger
        than memory keeps only the images of the sites that train resident; slicing it (one
        site = rows a:b) makes views, not copies. Copy-on-write mapping: nothing writes back.
        """
        pixels = np.load(images, mmap_mode="c" if mmap else None)
        return ArrayDataset(torch.from_numpy(pixels), torch.from_numpy(np.load(labels)))

    def to(self, device: torch.device | str) -> ArrayDataset:
        """The same dataset on ``device`` (GPU-resident uint8 when it fits)."""
        return ArrayDataset(
            images=self.images.to(device),
            labels=self.labels.to(device),
            masks=None if self.masks is None else self.masks.to(device),
            case_ids=self.case_ids,
        )

    @property
    def num_classes(self) -> int:
        return int(self.labels.max().item()) + 1 if len(self) else 0

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """(H, W), or (D, H, W) for volumes."""
        return tuple(int(s) for s in self.images.shape[2:])

    @property
    def num_mask_classes(self) -> int:
        """Labels in the masks (background included); 0 without masks."""
        if self.masks is None or not len(self):
            return 0
        return int(self.masks.max().item()) + 1

    def num_outputs(self, task: Task) -> int:
        """Output channels the network needs: image classes, or mask labels; at least two."""
        n = self.num_classes if task is Task.CLASSIFICATION else self.num_mask_classes
        return max(n, 2)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=2).tolist()


@dataclass(frozen=True)
class Site:
    name: str
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset | None = None
    meta: dict[str, object] = field(default_factory=dict)

    @staticmethod
    def from_dataset(
        name: str,
        data: ArrayDataset,
        *,
        val_fraction: float = 0.2,
        seed: int = 0,
        meta: dict[str, object] | None = None,
    ) -> Site:
        train_idx, val_idx = stratified_split(
            data.labels.numpy(), val_fraction=val_fraction, seed=seed
        )
        return Site(name, data.subset(train_idx), data.subset(val_idx), meta=dict(meta or {}))


@dataclass(frozen=True)
class Federation:
    sites: tuple[Site, ...]
    external: Site | None = None

    def __post_init__(self) -> None:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        if not self.sites:
            raise ValueError("a federation needs at least one site")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites: {', '.join(self.names)}")

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def pooled_train(self) -> ArrayDataset:
        return ArrayDataset.concat([s.train for s in self.sites])

    def pooled_val(self) -> ArrayDataset:
        return ArrayDataset.concat([s.val for s in self.sites])

    def pooled(self, name: str = "pooled") -> Site:
        """One site holding everyone's data: the centralized baseline."""
        return Site(name, self.pooled_train(), self.pooled_val())

    @property
    def in_chans(self) -> int:
        return self.sites[0].train.in_chans

    @property
    def num_classes(self) -> int:
        return max(max(s.train.num_classes, s.val.num_classes) for s in self.sites)

    def num_outputs(self, task: Task) -> int:
        return max(max(s.train.num_outputs(task), s.val.num_outputs(task)) for s in self.sites)

    def check_task(self, task: Task) -> None:
        """Segmentation needs a mask for every image; say which site lacks them, before training."""
        if task is Task.CLASSIFICATION:
            return
        for site in (*self.sites, *([self.external] if self.external is not None else [])):
            for split, data in (("train", site.train), ("val", site.val)):
                if len(data) and data.masks is None:
                    raise ValueError(
                        f"task segmentation needs masks, but site {site.name!r} has none in its "
                        f"{split} split (give mask_path in the manifest, or use a source with masks)"
                    )
