"""The ledger of runs without a server in the loop: cyclic, gossip and one-shot.

The entries are the client-server ledger's (:mod:`medfed.audit.ledger`): a ``run_start`` that pins
every key, site-signed ``update`` entries, one coordinator ``round`` entry per round, a
``checkpoint`` per checkpoint and a ``run_end``. What differs is what a site signs:

* **cyclic**: each hop. The site that trained signs the digest of the model it passes on, the
  digest of the model it trained from and who sent it (``sender``; null for the seed-derived
  initial model), its place in the cycle (``round`` = cycle, ``hop``) and the site it hands the
  model to (``receiver``: the next site in the cycle's order, at the cycle's end the first site
  of the next cycle, null after the last cycle).
* **gossip**: each accepted step. The pulling site signs the step index, its own model before the
  step (``from_version``/``from_digest``), every peer model it merged (site, version, digest), and
  its new model's digest and version. Versions count accepted trainings, so (site, version) names
  one model: a step that merged a (site, version) whose digest the chain never recorded, or a
  version the chain has not reached, is a fork.
* **one_shot**: each site's single upload (the digest of its teacher, the SHA-256 of the teacher's
  file and the head of the teacher's own local-training ledger); the coordinator's ``round`` entry
  0 carries the student's digest and the distillation settings (``distill``).

**Who signs the order.** Peer-to-peer has no coordinator in the loop, but the in-process
simulator runs the loop, and it plays the run's orchestrator with the run's coordinator key, as
the client-server simulator does: it collects the sites' signed entries, checks their signatures
on arrival and appends them in the order the run executed, closing each round with its own signed
``round`` entry that links to everything before it. The coordinator's signature proves the order
and completeness of the record as the orchestrator saw it (and, with keys generated into
RUN_DIR, only that nobody without that directory changed it afterwards). The sites' signatures
prove each model hand-over independently of the orchestrator: every hop names the digest it
started from and every gossip step the versions it merged, so an orchestrator that dropped,
reordered or invented an entry breaks a lineage that it cannot re-sign for the sites
(:mod:`medfed.audit.lineage` checks it). It cannot prove that a site trained on what it claims,
only what it claims to have received and sent.

**Resume** appends a ``resume`` entry and re-records the rounds after the checkpoint, exactly as
the client-server ledger (:class:`medfed.audit.run.RunLedger`, which this module drives).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfed.audit.canonical import canonical_json, file_digest, tensor_digest
from medfed.audit.ledger import EntryKind, SqliteChain, head_hash, sign_body
from medfed.audit.run import LEDGER_FILE, RunLedger
from medfed.audit.site import Receipt, SiteLedger
from medfed.types import Paradigm, Params, Update

ORCHESTRATOR = "in-process orchestrator"  # run_start "runtime": no server trains or aggregates


def _metrics(update: Update) -> dict[str, float]:
    return {str(k): float(v) for k, v in update.metrics.items()}


def sign_entry(site: SiteLedger, round_idx: int, fields: Mapping[str, Any]) -> Receipt:
    """``site`` signs an ``update`` entry: the run's identity, the round, its replica head, and
    ``fields``; needs nothing from the orchestrator but the replica the site already holds."""
    start = site.run_start()
    body = canonical_json(
        {
            "run_id": start["run_id"],
            "config_hash": start["config_hash"],
            "round": round_idx,
            "site": site.site,
            "replica_head": head_hash(site.store),
            **fields,
        }
    )
    signature = sign_body(site.key, EntryKind.UPDATE, site.site, body, link=None)
    return Receipt(site.site, body, signature)


class PeerLedger:
    """Drives a :class:`RunLedger` for a cyclic, gossip or one-shot run in the simulator."""

    def __init__(self, ledger: RunLedger, *, config: Any) -> None:
        self.ledger, self.config = ledger, config
        self.paradigm = Paradigm(config.paradigm)
        self.models: dict[str, tuple[int, str]] = {}  # gossip: site -> (version, digest)

    @classmethod
    def for_run(
        cls, config: Any, run_dir: Path, *, sites: Sequence[str], config_hash: str
    ) -> PeerLedger | None:
        """None when ``ledger.enabled`` is off; keys and replicas as in a client-server run."""
        ledger = RunLedger.for_run(
            config, run_dir, site_names=sites, runtime=None, config_hash=config_hash
        )
        return None if ledger is None else cls(ledger, config=config)

    def begin(
        self,
        *,
        last_round: int,
        sites: Sequence[str],
        initial: Params | None,
        strategy: str,
        topology: Mapping[str, Any],
        versions: Mapping[str, int] | None = None,
        models: Mapping[str, Params] | None = None,
    ) -> None:
        """Run start (or resume). ``initial``: the seed-derived model every site starts from,
        whose digest anchors the lineage; ``versions``/``models``: gossip's state to continue."""
        extra = {
            "paradigm": str(self.paradigm),
            "topology": dict(topology),
            "initial_digest": None if initial is None else tensor_digest(initial),
        }
        self.ledger.begin(
            last_round=last_round,
            strategy=strategy,
            runtime_name=ORCHESTRATOR,
            sites=sites,
            extra=extra,
        )
        if models is not None:
            v = versions or {}
            self.models = {s: (int(v.get(s, 0)), tensor_digest(p)) for s, p in models.items()}

    def begin_peer(
        self,
        last_round: int,
        *,
        initial: Params,
        models: Mapping[str, Params],
        versions: Mapping[str, int],
    ) -> None:
        """Run start (or resume) of a cyclic or gossip run, from the run's current state."""
        peer = self.config.peer
        cyclic = self.paradigm is Paradigm.CYCLIC
        self.begin(
            last_round=last_round,
            sites=list(models),
            initial=initial,
            strategy="fedavg",  # how gossip merges; a cycle only passes the model on
            topology={"name": str(self.paradigm)}
            | ({"order": str(peer.order)} if cyclic else {"pull": str(peer.pull)}),
            versions=dict(versions),
            models=None if cyclic else models,  # gossip's steps name their peers' versions
        )

    def deliver(self) -> dict[str, str]:
        """Every site receives the entries it lacks; a site that finds a fork refuses (site ->
        why) and takes no part in the round."""
        return self.ledger.deliver(list(self.ledger.sites))

    # --- what the sites sign ---
    def hop(
        self,
        round_idx: int,
        *,
        hop: int,
        update: Update,
        start: Params,
        sender: str | None,
        receiver: str | None,
    ) -> str:
        """Cyclic: the site that trained signs the hand-over; returns the passed-on digest."""
        digest = tensor_digest(update.params)
        receipt = sign_entry(
            self.ledger.sites[update.site],
            round_idx,
            {
                "topology": str(Paradigm.CYCLIC),
                "hop": hop,
                "sender": sender,
                "start_digest": tensor_digest(start),
                "receiver": receiver,
                "digest": digest,
                "update_kind": str(update.kind),
                "num_examples": int(update.num_examples),
                "metrics": _metrics(update),
            },
        )
        self.ledger.queue(receipt, digest=digest)
        return digest

    def step(
        self,
        round_idx: int,
        *,
        step: int,
        update: Update,
        merged: Sequence[str],
    ) -> str:
        """Gossip: the pulling site signs which peer models it merged and what it made of them."""
        site = update.site
        version, own = self.models[site]
        digest = tensor_digest(update.params)
        receipt = sign_entry(
            self.ledger.sites[site],
            round_idx,
            {
                "topology": str(Paradigm.GOSSIP),
                "step": step,
                "from_version": version,
                "from_digest": own,
                "merged": [
                    {"site": p, "version": self.models[p][0], "digest": self.models[p][1]}
                    for p in sorted(merged)
                ],
                "version": version + 1,
                "digest": digest,
                "update_kind": str(update.kind),
                "num_examples": int(update.num_examples),
                "metrics": _metrics(update),
            },
        )
        self.ledger.queue(receipt, digest=digest)
        self.models[site] = (version + 1, digest)
        return digest

    def upload(
        self,
        *,
        site: str,
        params: Params,
        num_examples: int,
        metrics: Mapping[str, float],
        teacher_dir: Path,
        teacher_model: str,
    ) -> None:
        """One-shot: the site signs its single upload, naming its teacher's file and ledger."""
        digest = tensor_digest(params)
        run_dir = self.ledger.run_dir
        final = teacher_dir / "final.safetensors"
        own_ledger = teacher_dir / LEDGER_FILE
        teacher_head = None
        if own_ledger.is_file():  # links the two chains: the teacher's history is in its own
            store = SqliteChain(own_ledger, create=False)
            try:
                teacher_head = head_hash(store) if len(store) else None
            finally:
                store.close()
        receipt = sign_entry(
            self.ledger.sites[site],
            0,
            {
                "topology": str(Paradigm.ONE_SHOT),
                "digest": digest,
                "update_kind": "weights",
                "num_examples": int(num_examples),
                "metrics": {str(k): float(v) for k, v in metrics.items()},
                "teacher_model": teacher_model,
                "teacher_file": {final.relative_to(run_dir).as_posix(): file_digest(final)},
                "teacher_ledger_head": teacher_head,
            },
        )
        self.ledger.queue(receipt, digest=digest)

    # --- what the orchestrator writes ---
    def round(
        self,
        round_idx: int,
        *,
        consensus: Params,
        included: Sequence[str],
        rejected: Mapping[str, str],
        strategy: str,
        extra: Mapping[str, Any],
    ) -> None:
        """The round's site entries, then the orchestrator's signed ``round`` entry over the
        consensus (peer-to-peer) or the distilled student (one-shot)."""
        self.ledger.round(
            round_idx,
            global_params=consensus,
            strategy=strategy,
            included=sorted(set(included)),
            rejected=rejected,
            privacy=None,
            extra={"topology": str(self.paradigm), **extra},
        )

    def peer_round(
        self,
        round_idx: int,
        *,
        consensus: Params,
        included: Sequence[str],
        rejected: Mapping[str, str],
        order: Sequence[str],
        versions: Mapping[str, int],
        steps: Sequence[Mapping[str, Any]],
    ) -> None:
        """A cyclic round records its visit order; a gossip round its steps and versions."""
        self.round(
            round_idx,
            consensus=consensus,
            included=included,
            rejected=rejected,
            strategy=str(self.paradigm),
            extra={"order": list(order)}
            if self.paradigm is Paradigm.CYCLIC
            else {"versions": dict(versions), "steps": [dict(s) for s in steps]},
        )

    def checkpoint(self, round_idx: int, path: Path) -> None:
        self.ledger.checkpoint(round_idx, path)

    def end(
        self, *, rounds: int, final_params: Params, final: Path, files: Sequence[Path] = ()
    ) -> None:
        self.ledger.end(
            rounds=rounds, global_params=final_params, final=final, stopped=None, files=files
        )
