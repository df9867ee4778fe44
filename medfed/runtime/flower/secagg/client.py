"""SecAgg+ site half: medfed's local round under Flower's ``secaggplus_mod`` masking."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar

from medfed.algorithms.base import LocalTask
from medfed.client.train import resolve_device
from medfed.config import FaultKind, RunConfig
from medfed.privacy.run import create_algorithm
from medfed.runtime.flower import client as medfed_client
from medfed.runtime.flower.codec import Field, Key, as_float, as_int, from_record, to_record
from medfed.runtime.flower.secagg.layout import ndarrays_to_params, to_numpy
from medfed.runtime.flower.secagg.plan import SecAggError
from medfed.runtime.inprocess import InjectedFault, fault_for, local_round
from medfed.types import Params


class SecAggSiteClient(NumPyClient):
    """One site's local round for a SecAgg+ round: medfed's training, Flower's masking."""

    def __init__(self, context: Context) -> None:
        self.node_context = context

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        run = RunConfig.model_validate_json(str(config[Field.CONFIG]))
        round_idx = as_int(config[Field.ROUND])
        keys: list[str] = json.loads(str(config[Field.SECAGG_KEYS]))
        site = medfed_client.site_for(self.node_context, run)
        device = resolve_device(run.device)
        model = medfed_client._model(run, site).to(device)
        ours = model.state_dict()
        if set(keys) != set(ours) or len(parameters) != len(keys):
            raise SecAggError(
                f"site {site.name!r}: the server's model ({len(keys)} tensors) is not this "
                f"site's {run.model.name} ({len(ours)} tensors)"
            )
        like = {k: ours[k] for k in keys}
        global_params = ndarrays_to_params(parameters, like)
        fault = fault_for(run.faults, site.name, round_idx)
        if fault is not None and fault.kind in (FaultKind.RAISE, FaultKind.DROP):
            raise InjectedFault(f"injected fault at site {site.name} ({fault.kind})")
        algorithm = create_algorithm(run, num_sites=1)
        # Site-held state (privacy.dp: the site's own accountant, which refuses to overspend
        # whatever the server asks) stays in the node's Context between rounds.
        state = {
            k.removeprefix(Key.STATE): from_record(rec)
            for k, rec in self.node_context.state.array_records.items()
            if k.startswith(Key.STATE)
        }
        task = LocalTask(
            site=site.name,
            round_idx=round_idx,
            global_params={k: v.to(device) for k, v in global_params.items()},
            client_state=state,
            kind=run.task,
        )
        data = site.train.to(device) if device.type == "cuda" else site.train
        # privacy.dp local: clip -> noise happen in here, at the site, before the masking below.
        result = local_round(algorithm, model, task, data, run.train, device=device, seed=run.seed)
        for group, tensors in result.client_state.items():
            self.node_context.state[f"{Key.STATE}{group}"] = to_record(tensors)
        update = result.update
        vector = upload_vector(
            update.params,
            global_params,
            keys,
            train_loss=float(update.metrics.get("train_loss", float("nan"))),
            step_scale=as_float(config[Field.SECAGG_STEP_SCALE]),
        )
        weight = clipping_scale(
            update.num_examples,
            max_weight=as_float(config[Field.SECAGG_MAX_WEIGHT]),
            quantization_range=as_int(config[Field.SECAGG_QUANTIZATION_RANGE]),
            site=site.name,
        )
        clip = as_float(config[Field.SECAGG_CLIPPING_RANGE])
        bad = [
            k for k, a in zip([*keys, "extras"], vector, strict=True) if not np.isfinite(a).all()
        ]
        if bad:
            raise SecAggError(
                f"site {site.name!r}: non-finite values in {', '.join(bad[:3])} (training "
                "diverged?); not uploading them, this site drops out of the round"
            )
        clipped = any(bool((np.abs(a) * weight > clip).any()) for a in vector)
        vector[-1][1] = 1.0 if clipped else 0.0
        # Only the example count travels in the clear (Flower needs it); no per-site metric.
        return vector, int(update.num_examples), {}


def upload_vector(
    params: Params,
    global_params: Params,
    keys: Sequence[str],
    *,
    train_loss: float,
    step_scale: float,
) -> NDArrays:
    """The arrays a site masks: float tensors as they are, integer tensors as
    ``(value - global) / step_scale``, then ``[train_loss, clipped flag]``; all flat.

    Flat because ``SecAggPlusWorkflow.unmask_stage`` shifts and rescales the dequantised arrays
    in place (``vec += offset``), which a 0-d array -- a scalar buffer such as BatchNorm's
    ``num_batches_tracked`` -- silently escapes (numpy turns it into a scalar on the way).
    """
    out: NDArrays = []
    for k in keys:
        v = params[k].detach().cpu()
        if v.is_floating_point():
            out.append(to_numpy(v).reshape(-1))
        else:
            g = global_params[k].detach().cpu()
            out.append(((v.double() - g.double()) / step_scale).numpy().reshape(-1))
    out.append(np.array([train_loss, 0.0], dtype=np.float64))
    return out


def clipping_scale(
    num_examples: int, *, max_weight: float, quantization_range: int, site: str = ""
) -> float:
    """The factor ``secaggplus_mod`` multiplies the upload by (the quantised weight)."""
    if num_examples > max_weight:
        raise SecAggError(
            f"site {site!r} trained on {num_examples} examples, more than max_weight="
            f"{max_weight:g}: its weight would overflow the protocol; raise max_weight"
        )
    return round(num_examples / max_weight * quantization_range) / quantization_range


def _client_fn(context: Context) -> Any:
    return SecAggSiteClient(context).to_client()


def medfed_messages_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """medfed's own exchanges (site discovery, federated evaluation) bypass the legacy client:
    the server's ``discover`` and ``FlowerRuntime.evaluate`` work unchanged."""
    kind = msg.metadata.message_type
    if kind == MessageType.QUERY:
        return medfed_client.describe(msg, context)
    if kind == MessageType.EVALUATE and Key.GLOBAL in msg.content.array_records:
        return medfed_client.evaluate(msg, context)
    result: Message = call_next(msg, context)
    return result


secagg_client_app = ClientApp(client_fn=_client_fn, mods=[medfed_messages_mod, secaggplus_mod])
"""The site half: medfed's data, training and evaluation; Flower's SecAgg+ masking of uploads."""
