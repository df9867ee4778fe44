"""The server half on Flower: a ServerApp whose main drives medfed's own round loop.

Flower carries messages (``Grid.send_and_receive``); medfed keeps everything else: the topology's
plan, update validation, the strategy's pure ``aggregate``, checkpoints and history. Flower's own
strategy classes are not used, so a federation computes the same thing whichever runtime
carries it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from torch import nn

from medfed.audit.run import RunLedger
from medfed.audit.site import Receipt
from medfed.build import model_for_shape
from medfed.client.train import resolve_device
from medfed.config import RunConfig, load_config
from medfed.engine import (
    FederationError,
    RoundEval,
    RunResult,
    _prepare_dir,
    train_loop,
)
from medfed.privacy.run import create_algorithm
from medfed.progress import Reporter
from medfed.runtime.flower.codec import (
    Field,
    Key,
    as_float,
    as_int,
    entries_record,
    groups_to_records,
    pooled_auc,
    receipt_from_content,
    to_record,
    update_from_content,
)
from medfed.runtime.flower.he import (
    FlowerEncryptedAggregation,
    HEKey,
    HEProtocolError,
    agreed_public_context,
)
from medfed.runtime.inprocess import Failure, Outcome
from medfed.types import Buffers, ClientState, Paradigm, Params, Task

GONE_GRACE_S = 5.0
"""How long an exchange waits for a site that missed an earlier one, once the others answered."""
POLL_INTERVAL_S = 1.0


class FlowerRuntime:
    """medfed's ``Runtime`` over a Flower ``Grid``: one message per sampled site and round."""

    def __init__(
        self, grid: Grid, *, nodes: Mapping[str, int], config: RunConfig, timeout: float
    ) -> None:
        self.grid = grid
        self.nodes = dict(nodes)
        self.config_json = config.model_dump_json()
        self.task = config.task
        self.timeout = timeout
        # Site-held state stays at the sites (Context.state); the server never sees it.
        self.client_states: dict[str, ClientState] = {}
        # Sites that did not answer an earlier exchange: site -> why. They are still sent
        # every message (a restarted node rejoins by answering), but no exchange waits more
        # than ``gone_grace`` seconds for them once every other site has answered.
        self.gone: dict[str, str] = {}
        self.gone_grace = min(timeout, GONE_GRACE_S)
        # The ledger (medfed.audit): sites' pinned keys from discovery, their signed receipts,
        # and how much of the chain each site has accepted (it is sent the rest).
        self.site_public_keys: dict[str, str] | None = None
        self.ledger: RunLedger | None = None
        self.receipts: dict[str, Receipt] = {}
        self.ledger_sent: dict[str, int] = {}
        # privacy.he: the sites encrypt and decrypt; train_loop merges through this (he.py).
        self.encrypted_aggregation: FlowerEncryptedAggregation | None = None

    def _ledger_records(self, sites: Sequence[str]) -> tuple[dict[str, ConfigRecord], int]:
        if self.ledger is None or not sites:
            return {}, 0
        start = min(self.ledger_sent.get(s, 0) for s in sites)
        entries = self.ledger.store.entries(start)
        return {Key.LEDGER: entries_record(entries)}, start + len(entries)

    def _task(self, round_idx: int) -> ConfigRecord:
        return ConfigRecord({Field.CONFIG: self.config_json, Field.ROUND: round_idx})

    def _exchange(
        self,
        kind: str,
        round_idx: int,
        sites: Sequence[str],
        content: Callable[[], RecordDict],
    ) -> dict[str, Message | str]:
        """Send to every site; the reply, or why there is none, per site.

        Waits up to ``timeout`` s for the sites that answered last time; a site that has not
        (``self.gone``) is waited for only while others are still pending, or ``gone_grace`` s,
        so one dead SuperNode costs one timeout, not one per exchange.
        """
        msgs = [
            Message(content=content(), dst_node_id=self.nodes[s], message_type=kind) for s in sites
        ]
        ids: list[str | None] = list(self.grid.push_messages(msgs))
        if len(ids) != len(sites):  # nothing pushed (e.g. payload too large)
            ids = [None] * len(sites)
        start = time.monotonic()
        pending = {mid: site for mid, site in zip(ids, sites, strict=True) if mid}
        got: dict[str, Message] = {}
        while pending:
            for msg in self.grid.pull_messages(list(pending)):
                site = pending.pop(msg.metadata.reply_to_message_id, None)
                if site is not None:
                    got[site] = msg
            waited = time.monotonic() - start
            live_pending = any(s not in self.gone for s in pending.values())
            if not pending or waited >= self.timeout:
                break
            if not live_pending and waited >= self.gone_grace:
                break
            time.sleep(POLL_INTERVAL_S)
        out: dict[str, Message | str] = {}
        for site, mid in zip(sites, ids, strict=True):
            reply = got.get(site)
            if not mid:
                out[site] = "the SuperLink refused the message (node unknown or removed?)"
            elif reply is None:
                if site in self.gone:
                    out[site] = f"no reply (dropped out? {self.gone[site]})"
                else:
                    out[site] = f"no reply within {self.timeout:g} s (dropped out?)"
                    self.gone[site] = f"silent since round {round_idx}'s {kind}"
            elif reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                out[site] = "dropped out: the SuperLink reports its SuperNode unavailable"
                self.gone.setdefault(site, "SuperNode unavailable")
            else:
                self.gone.pop(site, None)  # answered: alive (again)
                if reply.has_error():
                    out[site] = f"site error {reply.error.code}: {reply.error.reason}"
                else:
                    out[site] = reply
        return out

    def execute(
        self,
        round_idx: int,
        participants: Sequence[str],
        global_params: Params,
        payload: Buffers,
        *,
        on_site: Callable[[str], None] | None = None,
    ) -> list[Outcome]:
        ledger, sent = self._ledger_records(participants)

        def content() -> RecordDict:
            return RecordDict(
                {
                    Key.GLOBAL: to_record(global_params),
                    Key.TASK: self._task(round_idx),
                    **groups_to_records(Key.PAYLOAD, payload),
                    **ledger,
                }
            )

        outcomes: list[Outcome] = []
        self.receipts = {}
        replies = self._exchange(MessageType.TRAIN, round_idx, participants, content)
        for site, reply in replies.items():
            if isinstance(reply, str):
                outcomes.append(Failure(site, reply))
                continue
            try:
                outcomes.append(update_from_content(site, reply.content))
                receipt = receipt_from_content(reply.content)
            except (KeyError, ValueError, TypeError) as err:
                outcomes.append(Failure(site, f"malformed reply: {err}"))
                continue
            if receipt is not None:
                self.receipts[site] = receipt
                self.ledger_sent[site] = sent
        return outcomes

    def sync_ledger(self) -> dict[str, str]:
        """After the last round: every site receives the entries it lacks; site -> its head
        (equal to the coordinator's when its replica agrees), or why it did not answer."""
        if self.ledger is None:
            return {}
        ledger, _ = self._ledger_records(list(self.nodes))

        def content() -> RecordDict:
            return RecordDict({Key.TASK: self._task(-1), **ledger})

        replies = self._exchange(f"{MessageType.QUERY}.ledger", -1, list(self.nodes), content)
        return {
            site: r if isinstance(r, str) else str(r.content.config_records[Key.LEDGER][Field.HEAD])
            for site, r in replies.items()
        }

    def evaluate(self, round_idx: int, global_params: Params) -> RoundEval:
        """Federated evaluation: each site scores its own validation split."""

        def content() -> RecordDict:
            return RecordDict(
                {Key.GLOBAL: to_record(global_params), Key.TASK: self._task(round_idx)}
            )

        site_val: dict[str, dict[str, float]] = {}
        hists: dict[str, tuple[list[int], list[int]]] = {}
        replies = self._exchange(MessageType.EVALUATE, round_idx, list(self.nodes), content)
        if self.task is Task.SEGMENTATION:
            return _pooled_segmentation(replies)
        for site, reply in replies.items():
            if isinstance(reply, str):
                continue
            m = reply.content.metric_records[Key.METRICS]
            site_val[site] = {
                "auc": as_float(m.get(Field.AUC, float("nan"))),
                "acc": as_float(m.get(Field.ACC, float("nan"))),
                "n": as_float(m[Field.N]),
            }
            if Field.HIST_POS in m:
                hists[site] = (list(m[Field.HIST_POS]), list(m[Field.HIST_NEG]))  # type: ignore[arg-type]
        n = np.array([v["n"] for v in site_val.values()])
        acc = np.array([v["acc"] for v in site_val.values()])
        pooled_acc = float((n * acc).sum() / n.sum()) if n.sum() else float("nan")
        auc = pooled_auc(hists) if hists else float("nan")
        return RoundEval({"auc": auc, "acc": pooled_acc}, site_val)


def _pooled_segmentation(replies: Mapping[str, Message | str]) -> RoundEval:
    """Pool the sites' summed confusion counts: the metrics of all validation pixels at once."""
    from medfed.metrics.segmentation import summarize

    site_val: dict[str, dict[str, float]] = {}
    counts, dice_sum, images = [], 0.0, 0
    for site, reply in replies.items():
        if isinstance(reply, str):
            continue
        m = reply.content.metric_records[Key.METRICS]
        site_val[site] = {
            k: as_float(v) for k, v in m.items() if k not in (Field.COUNTS, Field.IMAGE_DICE_SUM)
        }
        flat = np.asarray(m[Field.COUNTS], dtype=np.int64)
        counts.append(flat.reshape(1, -1, 4))
        if Field.IMAGE_DICE_SUM in m:
            dice_sum += as_float(m[Field.IMAGE_DICE_SUM])
            images += as_int(m[Field.N])
    if not counts:
        return RoundEval({}, site_val)
    pooled = dict(summarize(np.concatenate(counts).sum(axis=0, keepdims=True)))
    pooled[Field.MEAN_IMAGE_DICE] = dice_sum / images if images else float("nan")
    return RoundEval(pooled, site_val)


def discover(
    grid: Grid,
    config: RunConfig,
    *,
    expected: int,
    timeout: float,
    keys: dict[str, str] | None = None,
    he_public: dict[str, bytes | None] | None = None,
) -> tuple[dict[str, int], dict[str, int], tuple[int, ...] | None]:
    """Wait for ``expected`` SuperNodes; ask each which site it is and its data's shape.

    ``keys`` receives each site's ledger public key (pinned in the run's first ledger entry),
    ``he_public`` each site's CKKS public context (``privacy.he``).
    """
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of {expected} SuperNodes connected within {timeout:g} s"
            )
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    task = ConfigRecord({Field.CONFIG: config.model_dump_json(), Field.ROUND: -1})
    msgs = [
        Message(RecordDict({Key.TASK: task}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    site_of: dict[str, int] = {}
    shape: dict[str, int] = {}
    spatial: tuple[int, ...] | None = None
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise FederationError(
                f"SuperNode {reply.metadata.src_node_id} cannot serve this run: "
                f"{reply.error.reason}"
            )
        rec = reply.content.config_records[Key.SITE]
        name = str(rec[Field.NAME])
        if name in site_of:
            raise FederationError(f"two SuperNodes claim site {name!r}")
        site_of[name] = reply.metadata.src_node_id
        if keys is not None and Field.LEDGER_KEY in rec:
            keys[name] = str(rec[Field.LEDGER_KEY])
        if he_public is not None:
            public = rec.get(HEKey.PUBLIC)
            he_public[name] = public if isinstance(public, bytes) else None
        reported: dict[str, int] = {
            str(k): as_int(rec[k]) for k in (Field.NUM_CLASSES, Field.IN_CHANS, Field.IMAGE_SIZE)
        }
        # A site may lack the rarest class; the network needs every class any site has.
        classes = max(shape.get(Field.NUM_CLASSES, 0), reported[Field.NUM_CLASSES])
        shape = {**reported, str(Field.NUM_CLASSES): classes}
        if Field.SPATIAL_SHAPE in rec:
            site_shape = tuple(as_int(s) for s in rec[Field.SPATIAL_SHAPE])  # type: ignore[union-attr]
            if spatial is not None and site_shape != spatial:
                raise FederationError(
                    f"site {name!r} has images of size {site_shape}, others {spatial}: every "
                    "site must resize to the same shape (the data config's image options)"
                )
            spatial = site_shape
    if len(site_of) < len(nodes):
        raise FederationError(
            f"only {len(site_of)} of {len(nodes)} SuperNodes answered within {timeout:g} s "
            f"(answered: {', '.join(sorted(site_of)) or 'none'}); raise the run config's "
            "'timeout' if the sites are merely slow"
        )
    return dict(sorted(site_of.items())), shape, spatial


def discovered_model(
    config: RunConfig, shape: Mapping[str, int], spatial: tuple[int, ...] | None
) -> nn.Module:
    """The run's initial model, shaped by what :func:`discover` learned from the sites."""
    return model_for_shape(
        config,
        num_classes=shape[Field.NUM_CLASSES],
        in_chans=shape[Field.IN_CHANS],
        image_size=shape[Field.IMAGE_SIZE],
        spatial_shape=spatial,
    )


def serve(
    grid: Grid,
    config: RunConfig,
    *,
    out_dir: str | Path,
    num_sites: int,
    timeout: float = 600.0,
    progress: bool = True,
    resume: bool = False,
) -> RunResult:
    """The ServerApp's body: discover the sites, then medfed's loop over Flower.

    ``resume`` continues the run in ``out_dir`` from its last checkpoint, as ``medfed run
    --resume`` does in the simulator: the config must hash the same, the server's privacy
    accountant and the ledger carry on (the sites' replicas accept the chain they already hold),
    and each site keeps what its SuperNode kept (e.g. SCAFFOLD's c_i in the node's state).
    """
    out_dir = Path(out_dir)
    if config.paradigm is not Paradigm.FEDERATED:
        raise FederationError(f"the Flower runtime runs federated training, not {config.paradigm}")
    if resume and not (out_dir / "config.yaml").is_file():
        raise FederationError(f"{out_dir}: no run to resume (no config.yaml there)")
    _prepare_dir(out_dir, config, resume=resume)
    keys: dict[str, str] = {}
    he_public: dict[str, bytes | None] | None = None if config.privacy.he is None else {}
    nodes, shape, spatial = discover(
        grid, config, expected=num_sites, timeout=timeout, keys=keys, he_public=he_public
    )
    device = resolve_device(config.device)
    model = discovered_model(config, shape, spatial).to(device)
    algorithm = create_algorithm(config, num_sites=len(nodes))
    runtime = FlowerRuntime(grid, nodes=nodes, config=config, timeout=timeout)
    runtime.site_public_keys = keys  # the sites hold their keys; the ledger pins these
    if config.privacy.he is not None and he_public is not None:
        try:
            public = agreed_public_context(he_public, options=config.privacy.he)
        except HEProtocolError as err:
            raise FederationError(str(err)) from None
        runtime.encrypted_aggregation = FlowerEncryptedAggregation(
            public, send=runtime._exchange, task=runtime._task
        )

    def evaluate(round_idx: int, global_params: Params, _: Mapping[str, ClientState]) -> RoundEval:
        return runtime.evaluate(round_idx, global_params)

    result = train_loop(
        config,
        model=model,
        algorithm=algorithm,
        site_names=tuple(nodes),
        runtime=runtime,
        evaluate=evaluate,
        device=device,
        min_clients=config.federation.min_clients,
        fraction=config.federation.fraction,
        out_dir=out_dir,
        resume=resume,
        reporter=Reporter(enabled=progress),
        label="flower",
        resume_command="medfed flower run CONFIG --resume --out {out_dir} ...",
    )
    runtime.sync_ledger()  # the sites' replicas receive the run's last entries
    return result


def server_app(config: RunConfig, *, out_dir: str | Path, num_sites: int, **kw: Any) -> ServerApp:
    """A ServerApp bound to ``config`` (simulation and tests build it in Python)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, config, out_dir=out_dir, num_sites=num_sites, **kw)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: run config keys ``config`` (YAML path), ``out``, ``num-sites``,
    ``timeout`` and ``resume``."""
    rc = context.run_config
    if not rc.get("config"):
        raise FederationError("run config 'config' (path of the medfed YAML) is not set")
    config = load_config(str(rc["config"]))
    serve(
        grid,
        config,
        out_dir=Path(str(rc.get("out") or f"runs/{config.name}-flower")),
        num_sites=as_int(rc.get("num-sites", config.federation.min_clients)),
        timeout=as_float(rc.get("timeout", 600.0)),
        resume=str(rc.get("resume", "false")).lower() == "true",
    )


APP_TEMPLATE = Path(__file__).parent / "app_template" / "pyproject.toml"


def write_app_dir(dst: Path) -> Path:
    """A Flower App folder for ``flwr run``: only a pyproject naming medfed's components."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "pyproject.toml").write_text(APP_TEMPLATE.read_text())
    return dst
