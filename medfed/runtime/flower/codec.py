"""What crosses the wire between medfed's server and its sites, as Flower records.

Only parameters, example counts, metrics and per-class score histograms are encoded: there is no
field for an image, a mask, a case id or a per-case score, so nothing about a patient can ride
along by accident.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from medfed.audit.ledger import Entry
from medfed.audit.site import Receipt
from medfed.types import Buffers, ParamKind, Params, StrEnum, Update

HIST_BINS = 10_000  # score histogram resolution for the pooled AUC (scores quantised to 1e-4)


class Key(StrEnum):
    """Record names inside a message's RecordDict."""

    GLOBAL = "global"
    PARAMS = "params"
    TASK = "task"
    METRICS = "metrics"
    UPDATE = "update"
    SITE = "site"
    PAYLOAD = "payload."  # + group name, e.g. SCAFFOLD's server control variate
    EXTRAS = "extras."  # + group name, e.g. SCAFFOLD's delta control variate
    STATE = "medfed.state."  # + group name: site-held algorithm state in Context.state
    LEDGER = "medfed.ledger"  # ledger entries to a site; a site's signed receipt back
    LEDGER_STATE = "medfed.ledger-state"  # a site's key and replica in Context.state (no dir)


class Field(StrEnum):
    CONFIG = "medfed-config"  # the resolved RunConfig as JSON (no data, no secrets)
    ROUND = "round"
    KIND = "kind"
    NUM_EXAMPLES = "num_examples"
    NAME = "name"
    N_TRAIN = "n_train"
    NUM_CLASSES = "num_classes"
    IN_CHANS = "in_chans"
    IMAGE_SIZE = "image_size"
    SPATIAL_SHAPE = "spatial_shape"  # (H, W) or (D, H, W)
    AUC = "auc"
    ACC = "acc"
    N = "n"
    HIST_POS = "hist_pos"
    HIST_NEG = "hist_neg"
    COUNTS = "counts"  # segmentation: summed TP/FP/FN/TN per class, flattened (C * 4)
    MEAN_IMAGE_DICE = "mean_image_dice"
    IMAGE_DICE_SUM = "image_dice_sum"
    # SecAgg+ (secagg/): the fit config a site needs to shape its masked upload
    SECAGG_KEYS = "secagg-keys"  # JSON list: the state-dict keys, in the order of the arrays
    SECAGG_MAX_WEIGHT = "secagg-max-weight"  # the protocol's max_weight (examples per round)
    SECAGG_STEP_SCALE = "secagg-step-scale"  # integer buffers travel as delta / this
    SECAGG_CLIPPING_RANGE = "secagg-clipping-range"
    SECAGG_QUANTIZATION_RANGE = "secagg-quantization-range"
    # the ledger (medfed.audit): entries as JSON lines, a site's public key and receipt
    LEDGER_KEY = "ledger-key"  # describe: the site's Ed25519 public key (hex), pinned at start
    ENTRIES = "entries"
    HEAD = "head"
    RECEIPT = "receipt"  # JSON: the site's signed statement of the update it sent


def as_int(value: object) -> int:
    """A record value that must be a number, as int; anything else is a malformed message."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return int(value)


def as_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return float(value)


_BF16 = "@bfloat16"  # numpy has no bfloat16: such tensors travel bit-exact as int16


def to_record(params: Params) -> ArrayRecord:
    out = {}
    for k, v in params.items():
        t = v.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            out[f"{k}{_BF16}"] = t.view(torch.int16)
        else:
            out[k] = t
    return ArrayRecord(out)


def from_record(record: ArrayRecord) -> Params:
    out = {}
    for k, v in record.to_torch_state_dict().items():
        if k.endswith(_BF16):
            out[k.removesuffix(_BF16)] = v.view(torch.bfloat16).clone()
        else:
            out[k] = v.clone()
    return out


def groups_to_records(prefix: str, groups: Buffers) -> dict[str, ArrayRecord]:
    return {f"{prefix}{g}": to_record(p) for g, p in groups.items()}


def groups_from_content(prefix: str, content: RecordDict) -> dict[str, Params]:
    return {
        k.removeprefix(prefix): from_record(rec)
        for k, rec in content.array_records.items()
        if k.startswith(prefix)
    }


def update_content(update: Update) -> RecordDict:
    metrics = {k: float(v) for k, v in update.metrics.items()}
    return RecordDict(
        {
            Key.PARAMS: to_record(update.params),
            Key.METRICS: MetricRecord({**metrics, Field.NUM_EXAMPLES: int(update.num_examples)}),
            Key.UPDATE: ConfigRecord({Field.KIND: str(update.kind)}),
            **groups_to_records(Key.EXTRAS, update.extras),
        }
    )


def update_from_content(site: str, content: RecordDict) -> Update:
    metrics = dict(content.metric_records[Key.METRICS])
    num_examples = as_int(metrics.pop(Field.NUM_EXAMPLES))
    return Update(
        site=site,
        params=from_record(content.array_records[Key.PARAMS]),
        kind=ParamKind(str(content.config_records[Key.UPDATE][Field.KIND])),
        num_examples=num_examples,
        metrics={k: as_float(v) for k, v in metrics.items()},
        extras=groups_from_content(Key.EXTRAS, content),
    )


def score_histograms(labels: np.ndarray, scores: np.ndarray) -> tuple[list[int], list[int]]:
    """Per-class counts of the positive-class score in ``HIST_BINS`` bins of [0, 1]."""
    bins = np.minimum((np.clip(scores, 0.0, 1.0) * HIST_BINS).astype(np.int64), HIST_BINS - 1)
    pos = np.bincount(bins[labels == 1], minlength=HIST_BINS)
    neg = np.bincount(bins[labels != 1], minlength=HIST_BINS)
    return pos.tolist(), neg.tolist()


def pooled_auc(histograms: Mapping[str, tuple[list[int], list[int]]]) -> float:
    """Mann-Whitney AUC of the pooled, binned scores (ties within a bin count one half).

    Equals the exact pooled AUC up to the 1e-4 quantisation of scores, without any site sending a
    per-case score.
    """
    pos = np.sum([np.asarray(p, dtype=np.float64) for p, _ in histograms.values()], axis=0)
    neg = np.sum([np.asarray(n, dtype=np.float64) for _, n in histograms.values()], axis=0)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def entries_record(entries: list[Entry]) -> ConfigRecord:
    return ConfigRecord({Field.ENTRIES: [e.to_wire() for e in entries]})


def entries_from_content(content: RecordDict) -> list[Entry]:
    """The ledger entries a message carries (none: an empty list)."""
    if Key.LEDGER not in content.config_records:
        return []
    lines = content.config_records[Key.LEDGER].get(Field.ENTRIES, [])
    return [Entry.from_wire(str(x)) for x in lines]  # type: ignore[union-attr]


def receipt_from_content(content: RecordDict) -> Receipt | None:
    """A site's signed receipt riding with its update, if it sent one."""
    if Key.LEDGER not in content.config_records:
        return None
    return Receipt.from_wire(json.loads(str(content.config_records[Key.LEDGER][Field.RECEIPT])))


def receipt_record(receipt: Receipt, head: str) -> ConfigRecord:
    return ConfigRecord({Field.RECEIPT: json.dumps(receipt.to_wire()), Field.HEAD: head})
