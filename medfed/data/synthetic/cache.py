"""The on-disk cache every synthetic generator shares: one ``.npz`` per site and parameter set.

Files are written atomically (a concurrent reader never sees half a file), readable by everyone
sharing the cache, hold masks bit-packed, and are read back with ``allow_pickle=False``: a cache
directory is shared state and must never be a way to run code.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
import torch

from medfed.data.site import ArrayDataset

T = TypeVar("T")


def render_threads() -> int:
    """Render threads: ``$MEDFED_SYNTH_THREADS`` or the usable cores (at most 8)."""
    env = os.environ.get("MEDFED_SYNTH_THREADS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, int(env) if env else min(8, cores or 1))


def render_chunks(render: Callable[[int], T], n_chunks: int) -> list[T]:
    """``[render(0), ..., render(n_chunks - 1)]`` on :func:`render_threads` threads.

    Chunks draw from their own RNG streams, so threads change speed, never bytes; numpy's big
    array kernels release the GIL, so this uses every core.
    """
    workers = min(n_chunks, render_threads())
    if workers <= 1:
        return [render(c) for c in range(n_chunks)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(render, range(n_chunks)))


def default_cache_dir() -> Path:
    """``$MEDFED_CACHE_DIR`` or ``~/.cache/medfed``; generated data is cheap to rebuild."""
    return Path(os.environ.get("MEDFED_CACHE_DIR", Path.home() / ".cache" / "medfed"))


def write_npz(fh: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    """Write named arrays as an uncompressed .npz, laid out exactly as ``np.savez`` does.

    One ``<name>.npy`` member per array in a stored (uncompressed) zip, so ``np.load`` reads it
    back unchanged. Not ``np.savez(fh, **arrays)`` itself: there the array names share one keyword
    namespace with savez's own ``allow_pickle`` option (NumPy >= 2.1; older NumPy stores an
    ``allow_pickle=`` keyword as an array), so a dict of arrays cannot be passed to it type-safely
    and pickles cannot be refused portably. Here they are refused on every NumPy version, matching
    ``_load``'s ``allow_pickle=False``.
    """
    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def save_site(path: Path, data: ArrayDataset, features: dict[str, np.ndarray]) -> None:
    assert data.masks is not None
    arrays = {"images": data.images.numpy(), "labels": data.labels.numpy(),
              "masks": np.packbits(data.masks.numpy(), axis=-1),
              "mask_width": np.array(data.masks.shape[-1])}  # fmt: skip
    arrays |= {f"feature_{k}": v for k, v in features.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write_npz(fh, arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable
        os.replace(tmp, path)  # atomic: concurrent readers never see a half-written file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_site(path: Path) -> tuple[ArrayDataset, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        width = int(z["mask_width"])
        masks = np.unpackbits(z["masks"], axis=-1, count=width)
        features = {k[8:]: z[k] for k in z.files if k.startswith("feature_")}
        data = ArrayDataset(
            images=torch.from_numpy(z["images"]),
            labels=torch.from_numpy(z["labels"]),
            masks=torch.from_numpy(masks),
            case_ids=tuple(str(c) for c in features["case_id"]),
        )
    return data, features
