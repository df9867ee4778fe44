"""The site half on Flower: a ClientApp that runs medfed's client code on the site's own data.

Each SuperNode says which data is its own through ``--node-config``:

- ``site=NAME data-config=PATH``: the ``data`` section of the YAML run config at PATH (a CSV
  manifest, DICOM folder, ... on this machine) and the site of that name in it;
- in Flower's simulation, ``partition-id=K``: the K-th site of the run config's own ``data``
  section (the synthetic federation), so a simulation uses exactly the simulator's data.

The data is loaded at the site and never sent. Site-held algorithm state (FedBN's BatchNorm,
SCAFFOLD's c_i) lives in the node's ``Context.state`` between rounds.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from medfed.algorithms.base import LocalTask, load_params
from medfed.audit.keys import load_or_create, load_private_key, new_key, private_pem
from medfed.audit.ledger import Entry, MemoryChain, SqliteChain, head_hash
from medfed.audit.site import SiteLedger
from medfed.build import load_federation, model_for_shape
from medfed.client.train import predict_proba, resolve_device
from medfed.config import FaultKind, RunConfig, load_config
from medfed.data.site import Site
from medfed.evaluation import Scorer
from medfed.metrics.classification import accuracy, multiclass_auc
from medfed.privacy.run import create_algorithm
from medfed.runtime.flower.codec import (
    Field,
    Key,
    as_int,
    entries_from_content,
    from_record,
    groups_from_content,
    receipt_record,
    score_histograms,
    to_record,
    update_content,
)
from medfed.runtime.flower.he import (
    DECRYPT_ACTION,
    HEKey,
    decrypt_reply,
    seal_update,
    site_contexts,
)
from medfed.runtime.inprocess import InjectedFault, apply_fault, fault_for, local_round
from medfed.types import Task


class SiteDataError(RuntimeError):
    """The SuperNode's --node-config does not name usable data."""


@lru_cache(maxsize=4)
def _federation_sites(data_json: str) -> dict[str, Site]:
    from medfed.config import DataConfig

    fed, _ = load_federation(DataConfig.model_validate_json(data_json))
    return {s.name: s for s in fed.sites}


def site_for(context: Context, config: RunConfig) -> Site:
    """This node's site, from its node config (see the module docstring)."""
    node = context.node_config
    if "data-config" in node:
        if "site" not in node:
            raise SiteDataError("node config has data-config but no site=NAME")
        path = str(node["data-config"])
        sites = _federation_sites(load_config(path).data.model_dump_json())
        name = str(node["site"])
    elif "partition-id" in node:
        sites = _federation_sites(config.data.model_dump_json())
        index = as_int(node["partition-id"])
        if not 0 <= index < len(sites):
            raise SiteDataError(f"partition-id {index}: the federation has {len(sites)} sites")
        name = list(sites)[index]
    else:
        raise SiteDataError(
            "node config names no data: start the SuperNode with "
            "--node-config \"site='NAME' data-config='PATH'\""
        )
    if name not in sites:
        raise SiteDataError(f"site {name!r} is not in the data config; sites: {', '.join(sites)}")
    return sites[name]


def site_ledger(context: Context, site: str) -> SiteLedger:
    """This site's ledger key and replica of the run's ledger (medfed.audit).

    Node config ``ledger-dir=PATH`` (or ``$MEDFED_LEDGER_DIR``) keeps both on the site's disk:
    ``PATH/<site>.key`` (made on first use unless ``ledger-key=FILE`` names one) and the replica
    ``PATH/<site>-run<run id>.sqlite``. Without a folder both live in the node's ``Context.state``
    for the run. ``ledger-coordinator=HEX`` makes the site refuse a run not pinning that key.
    """
    node = context.node_config
    folder = node.get("ledger-dir") or os.environ.get("MEDFED_LEDGER_DIR")
    held = context.state.config_records.get(Key.LEDGER_STATE)
    if "ledger-key" in node:
        key = load_private_key(Path(str(node["ledger-key"])))
    elif folder:
        key = load_or_create(Path(str(folder)) / f"{site}.key")
    elif held is not None and "key" in held:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(str(held["key"]).encode(), password=None)  # type: ignore[assignment]
    else:
        key = new_key()
    if folder:
        store: SqliteChain | MemoryChain = SqliteChain(
            Path(str(folder)) / f"{site}-run{context.run_id}.sqlite"
        )
    else:
        lines = [] if held is None else list(held.get("entries", []))  # type: ignore[arg-type]
        store = MemoryChain(Entry.from_wire(str(x)) for x in lines)
    trusted = node.get("ledger-coordinator")
    return SiteLedger(site, key, store, coordinator_key=None if trusted is None else str(trusted))


def _keep_ledger(context: Context, ledger: SiteLedger) -> None:
    """Without a ledger folder the key and replica stay in the node's state between messages."""
    if isinstance(ledger.store, MemoryChain):
        held: dict[str, str | list[str]] = {}
        if "ledger-key" not in context.node_config:  # a generated key lives only here
            held["key"] = private_pem(ledger.key).decode()
        if len(ledger.store):
            held["entries"] = [e.to_wire() for e in ledger.store.entries()]
        context.state[Key.LEDGER_STATE] = ConfigRecord(held)  # type: ignore[arg-type]


def _config(msg: Message) -> RunConfig:
    return RunConfig.model_validate_json(str(msg.content.config_records[Key.TASK][Field.CONFIG]))


app = ClientApp()


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Who this node is and the shape of its data (never the data)."""
    config = _config(msg)
    site = site_for(context, config)
    images = site.train.images if len(site.train) else site.val.images
    ledger = site_ledger(context, site.name)
    _keep_ledger(context, ledger)
    record = ConfigRecord(
        {
            Field.LEDGER_KEY: ledger.public,  # pinned in the run's ledger; the key stays here
            Field.NAME: site.name,
            Field.N_TRAIN: len(site.train),
            Field.NUM_CLASSES: _num_outputs(config, site),
            Field.IN_CHANS: int(images.shape[1]),
            Field.IMAGE_SIZE: int(images.shape[-1]),
            Field.SPATIAL_SHAPE: [int(s) for s in images.shape[2:]],
        }
    )
    if config.privacy.he is not None:  # the key pair's public half; the secret stays here
        record[HEKey.PUBLIC] = site_contexts(context.node_config)[1]
    return Message(RecordDict({Key.SITE: record}), reply_to=msg)


def _num_outputs(config: RunConfig, site: Site) -> int:
    return max(site.train.num_outputs(config.task), site.val.num_outputs(config.task))


def _model(config: RunConfig, site: Site) -> nn.Module:
    images = site.train.images if len(site.train) else site.val.images
    return model_for_shape(
        config,
        num_classes=_num_outputs(config, site),
        in_chans=int(images.shape[1]),
        image_size=int(images.shape[-1]),
        spatial_shape=tuple(int(s) for s in images.shape[2:]),
    )


def _setup(msg: Message, context: Context) -> tuple[RunConfig, Site, torch.device, nn.Module]:
    """The run's config, this node's site, and a fresh model of the run's architecture."""
    config = _config(msg)
    site = site_for(context, config)
    device = resolve_device(config.device)
    return config, site, device, _model(config, site).to(device)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, site, device, model = _setup(msg, context)
    ledger = site_ledger(context, site.name)
    ledger.receive(entries_from_content(msg.content))  # a fork or a rewrite: refuse the round
    _keep_ledger(context, ledger)
    algorithm = create_algorithm(config, num_sites=1)  # a site's half needs no federation size
    # privacy.he: no secret context, no round (the error names the node-config key)
    he_public = None if config.privacy.he is None else site_contexts(context.node_config)[1]
    state = {
        k.removeprefix(Key.STATE): from_record(rec)
        for k, rec in context.state.array_records.items()
        if k.startswith(Key.STATE)
    }
    task = LocalTask(
        site=site.name,
        round_idx=as_int(msg.content.config_records[Key.TASK][Field.ROUND]),
        global_params=from_record(msg.content.array_records[Key.GLOBAL]),
        payload=groups_from_content(Key.PAYLOAD, msg.content),
        client_state=state,
        kind=config.task,
    )
    data = site.train.to(device) if device.type == "cuda" else site.train
    # Configured misbehaviour (robustness tests), exactly as the simulator injects it.
    fault = fault_for(config.faults, site.name, task.round_idx)
    if fault is not None and fault.kind in (FaultKind.RAISE, FaultKind.DROP):
        raise InjectedFault(f"injected fault at site {site.name} ({fault.kind})")
    result = local_round(
        algorithm, model, task, data, config.train, device=device, seed=config.seed
    )
    for group, tensors in result.client_state.items():  # stays at the site
        context.state[f"{Key.STATE}{group}"] = to_record(tensors)
    update = result.update
    if fault is not None:
        update = apply_fault(update, fault, task.global_params)
    if he_public is not None:  # screened here, then only ciphertext leaves (runtime/flower/he.py)
        update = seal_update(
            update,
            global_params=task.global_params,
            expected_keys=algorithm.uploaded_keys(),
            public_context=he_public,
        )
    reply = update_content(update)
    if len(ledger.store):  # the site signs exactly what it sends
        receipt = ledger.sign_update(task.round_idx, update)
        reply[Key.LEDGER] = receipt_record(receipt, head_hash(ledger.store))
    return Message(reply, reply_to=msg)


@app.query("ledger")
def ledger_sync(msg: Message, context: Context) -> Message:
    """The run's last entries (after its final round): checked and kept like any others."""
    site = site_for(context, _config(msg))
    ledger = site_ledger(context, site.name)
    ledger.receive(entries_from_content(msg.content))
    _keep_ledger(context, ledger)
    record = ConfigRecord({Field.HEAD: head_hash(ledger.store)})
    return Message(RecordDict({Key.LEDGER: record}), reply_to=msg)


@app.query(DECRYPT_ACTION)
def he_decrypt(msg: Message, context: Context) -> Message:
    """privacy.he: decrypt the round's encrypted mean for the server (never a single upload's:
    the server sums before it asks; see runtime/flower/he.py for the threat model)."""
    secret, _ = site_contexts(context.node_config)
    return Message(decrypt_reply(msg.content, secret_context=secret), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this site's validation split; only aggregates go back."""
    config, site, device, model = _setup(msg, context)
    load_params(model, from_record(msg.content.array_records[Key.GLOBAL]), device)
    if config.task is Task.SEGMENTATION:
        return Message(RecordDict({Key.METRICS: _segmentation_metrics(config, site, device, model)}),
                       reply_to=msg)  # fmt: skip
    proba = predict_proba(
        model,
        site.val,
        device=device,
        batch_size=config.train.eval_batch_size,
        normalize=config.train.normalize,
    )
    y = site.val.labels.numpy()
    metrics: dict[str, float | int | list[int]] = {
        Field.AUC: multiclass_auc(y, proba),
        Field.ACC: accuracy(y, proba),
        Field.N: len(y),
    }
    if proba.shape[1] == 2 and len(y):
        metrics[Field.HIST_POS], metrics[Field.HIST_NEG] = score_histograms(y, proba[:, 1])
    record = MetricRecord({k: v for k, v in metrics.items() if not _is_nan(v)})
    return Message(RecordDict({Key.METRICS: record}), reply_to=msg)


def _segmentation_metrics(
    config: RunConfig, site: Site, device: torch.device, model: nn.Module
) -> MetricRecord:
    """Summed confusion counts and the per-image Dice sum: enough to pool, no mask leaves."""
    scorer = Scorer(
        Task.SEGMENTATION,
        device=device,
        batch_size=config.train.eval_batch_size,
        normalize=config.train.normalize,
        num_classes=_num_outputs(config, site),
    )
    counts = scorer.cases(model, site.val, site=site.name)
    metrics = scorer.metrics(site.val, counts)
    record: dict[str, int | float | list[int] | list[float]] = {
        k: v for k, v in metrics.items() if not _is_nan(v)
    }
    record[Field.N] = len(site.val)
    record[Field.COUNTS] = [int(x) for x in counts.sum(axis=0).reshape(-1)]
    if Field.MEAN_IMAGE_DICE in metrics and not _is_nan(metrics[Field.MEAN_IMAGE_DICE]):
        record[Field.IMAGE_DICE_SUM] = float(metrics[Field.MEAN_IMAGE_DICE]) * len(site.val)
    return MetricRecord(record)


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and bool(np.isnan(value))


__all__ = ["app", "site_for"]
