"""The coordinator's half of the ledger, as the round loop drives it.

Layout under ``RUN_DIR``::

    ledger/ledger.sqlite            the coordinator's copy (append-only, see medfed.audit.ledger)
    ledger/replicas/<site>.sqlite   simulation: each site's replica, kept by that site's own checks
    keys/<name>.key|.pub            simulation: keys generated for the run when none were given

Keys generated into the run directory prove that the ledger file was not altered after the fact
by anyone without access to that directory; they prove nobody's identity. A real deployment gives
the coordinator a key made by ``medfed keys new`` and each Flower site its own (node config
``ledger-key``), and pins them in the run-start entry.

**Resume.** The chain is never rewritten. A resumed run appends a ``resume`` entry naming the
round it continues after; entries of later rounds written by the crashed attempt stay in the chain
as ``superseded`` (listed in the resume entry), and the rounds after it are recorded again.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.audit.canonical import canonical_json, file_digest, tensor_digest
from medfed.audit.keys import load_or_create, load_private_key, public_hex, verify_signature
from medfed.audit.ledger import (
    COORDINATOR,
    GENESIS,
    ChainStore,
    Entry,
    EntryKind,
    Issue,
    LedgerError,
    MemoryChain,
    Pins,
    SqliteChain,
    check_entry,
    head_hash,
    make_entry,
    signed_message,
)
from medfed.audit.site import Receipt, SiteLedger, update_digest
from medfed.checkpoint import checkpoint_dir
from medfed.types import Params, Update

LEDGER_FILE = Path("ledger") / "ledger.sqlite"
REPLICA_DIR = Path("ledger") / "replicas"
KEY_DIR = Path("keys")


def replica_path(run_dir: Path, site: str) -> Path:
    return run_dir / REPLICA_DIR / f"{site.replace('/', '_')}.sqlite"


def dir_digests(run_dir: Path, path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path``, keyed by its POSIX path relative to ``run_dir``."""
    return {
        f.relative_to(run_dir).as_posix(): file_digest(f)
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunLedger:
    """Appends the coordinator's entries and the sites' signed ones; keeps simulated replicas."""

    def __init__(
        self,
        run_dir: Path,
        *,
        key: Ed25519PrivateKey,
        site_keys: Mapping[str, str],
        sites: Mapping[str, SiteLedger],
        config_hash: str,
        runtime: Any,
        key_source: str,
    ) -> None:
        self.run_dir = run_dir
        self.store = SqliteChain(run_dir / LEDGER_FILE)
        self.key = key
        self.pins = Pins({COORDINATOR: public_hex(key), **site_keys})
        self.sites = dict(sites)  # simulated sites: their key and replica
        self.config_hash = config_hash
        self.runtime = runtime
        self.key_source = key_source
        self.run_id = ""
        self._pending: list[tuple[str, Receipt]] = []
        self._digests: dict[str, str] = {}
        self._sent: dict[str, int] = {}  # site -> entries delivered to it so far

    @classmethod
    def for_run(
        cls,
        config: Any,
        run_dir: Path,
        *,
        site_names: Sequence[str],
        runtime: Any,
        config_hash: str,
    ) -> RunLedger | None:
        """The run's ledger, or None when ``ledger.enabled`` is off.

        A runtime whose sites hold their own keys (Flower) exposes ``site_public_keys``; for the
        simulator the sites' keys and replicas are made here and handed to ``site_ledgers``.
        """
        cfg = config.ledger
        if not cfg.enabled:
            return None
        keys = run_dir / KEY_DIR
        key = (
            load_private_key(cfg.coordinator_key)
            if cfg.coordinator_key
            else load_or_create(keys / f"{COORDINATOR}.key")
        )
        remote = getattr(runtime, "site_public_keys", None)
        sites: dict[str, SiteLedger] = {}
        if remote is None:
            given = dict(cfg.site_keys or {})
            shared = None if cfg.replicas else MemoryChain()  # one copy for all simulated sites
            for site in site_names:
                site_key = (
                    load_private_key(given[site])
                    if site in given
                    else load_or_create(keys / f"{site.replace('/', '_')}.key")
                )
                store: ChainStore = (
                    SqliteChain(replica_path(run_dir, site), durable=False)
                    if shared is None
                    else shared
                )
                sites[site] = SiteLedger(site, site_key, store, coordinator_key=public_hex(key))
            site_pub = {s: sl.public for s, sl in sites.items()}
            source = (
                "provided"
                if cfg.coordinator_key and set(given) >= set(site_names)
                else "generated for this run"
            )
        else:
            site_pub = {str(s): str(k) for s, k in remote.items()}
            source = "provided" if cfg.coordinator_key else "coordinator key generated for this run"
        ledger = cls(
            run_dir,
            key=key,
            site_keys=site_pub,
            sites=sites,
            config_hash=config_hash,
            runtime=runtime,
            key_source=source,
        )
        if sites and hasattr(runtime, "site_ledgers"):
            runtime.site_ledgers = sites
        if remote is not None:
            runtime.ledger = ledger
        return ledger

    # --- appending ---
    @property
    def head(self) -> str:
        return head_hash(self.store)

    def _append(
        self, kind: EntryKind, body: Mapping[str, Any], *, before: Sequence[Entry] = ()
    ) -> Entry:
        """Sign and append a coordinator entry (after ``before``, in the same transaction)."""
        n = len(self.store) + len(before)
        entry = make_entry(
            index=n,
            prev=before[-1].hash if before else self.head,
            kind=kind,
            signer=COORDINATOR,
            body=canonical_json({"run_id": self.run_id, **body}),
            key=self.key,
        )
        self.store.append([*before, entry])
        return entry

    def begin(
        self,
        *,
        last_round: int,
        strategy: str,
        runtime_name: str,
        sites: Sequence[str],
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Run start on a fresh ledger; otherwise check the existing chain and append ``resume``.

        ``extra``: what a paradigm adds to the run-start entry (``medfed.audit.p2p``: paradigm,
        topology, the initial model's digest), which its verifier reads back.
        """
        if not len(self.store):
            from medfed import __version__

            self.run_id = uuid.uuid4().hex
            self._append(
                EntryKind.RUN_START,
                {
                    "config_hash": self.config_hash,
                    "medfed_version": __version__,
                    "created": _now(),
                    "runtime": runtime_name,
                    "strategy": strategy,
                    "sites": sorted(sites),
                    "keys": self.pins.hex,
                    "key_source": self.key_source,
                    "first_round": last_round + 1,
                    **(extra or {}),
                },
            )
            return
        entries = self.store.entries()
        prev = GENESIS
        for i, e in enumerate(entries):
            problem = check_entry(e, index=i, prev=prev, pins=None if i == 0 else self.pins)
            if problem is not None:
                raise LedgerError(i, *problem)
            if i == 0 and Pins.from_start(e).hex != self.pins.hex:
                raise LedgerError(
                    0, Issue.UNPINNED_SIGNER, _changed_keys(Pins.from_start(e).hex, self.pins.hex)
                )
            prev = e.hash
        self.run_id = str(entries[0].data["run_id"])
        superseded = sorted(
            {int(e.data["round"]) for e in entries if e.kind == EntryKind.ROUND}
            - set(range(last_round + 1))
        )
        self._append(
            EntryKind.RESUME,
            {
                "from_round": last_round,
                "superseded_rounds": superseded,
                "config_hash": self.config_hash,
                "at": _now(),
            },
        )
        ckpt = checkpoint_dir(self.run_dir, last_round)
        recorded = any(
            e.kind == EntryKind.CHECKPOINT and e.data["round"] == last_round for e in entries
        )
        if last_round >= 0 and ckpt.is_dir() and not recorded:
            self.checkpoint(last_round, ckpt)  # written just before the crash

    # --- the sites ---
    def deliver(self, participants: Sequence[str]) -> dict[str, str]:
        """Simulation: send each sampled site the entries it lacks; a site that finds a fork or a
        rewrite refuses the round (site -> why)."""
        refused: dict[str, str] = {}
        tails: dict[int, list[Entry]] = {}  # read once per starting point, not once per site
        for site in participants:
            sl = self.sites.get(site)
            if sl is None:
                continue
            # From what this coordinator last sent (not what the site holds: the site judges).
            start = self._sent.get(site, 0)
            if start not in tails:
                tails[start] = self.store.entries(start)
            entries = tails[start]
            try:
                sl.receive(entries)
                self._sent[site] = entries[-1].index + 1 if entries else self._sent.get(site, 0)
            except LedgerError as err:
                refused[site] = f"refused by the site: {err}"
        return refused

    def sync_all(self) -> None:
        self.deliver(list(self.sites))

    def admit(self, round_idx: int, update: Update) -> str | None:
        """Check the site's signed receipt for ``update`` and queue its entry; why not, or None."""
        receipt = getattr(self.runtime, "receipts", {}).get(update.site)
        if receipt is None:
            return "ledger: the update carries no signed receipt"
        public = self.pins.key(update.site)
        message = signed_message(EntryKind.UPDATE, update.site, receipt.body, None)
        if public is None or receipt.site != update.site:
            return f"ledger: no key pinned for site {update.site!r}"
        if not verify_signature(public, receipt.signature, message):
            return "ledger: the receipt's signature is not the site's pinned key's"
        try:
            body = Entry(0, "", "", "", "", receipt.body, "").data
        except ValueError:
            return "ledger: unreadable receipt"
        digest = update_digest(update)
        expected = {
            "run_id": self.run_id,
            "round": round_idx,
            "site": update.site,
            "digest": digest,
            "num_examples": update.num_examples,
            "replica_head": self.head,
        }
        wrong = [k for k, v in expected.items() if body.get(k) != v]
        if wrong:
            return f"ledger: the signed receipt does not match the update received ({', '.join(wrong)})"
        self._pending.append((update.site, receipt))
        self._digests[update.site] = digest
        return None

    def queue(self, receipt: Receipt, *, digest: str) -> None:
        """A site-signed entry the simulator received in-process (peer-to-peer, one-shot): its
        signature is checked now and it is written with the next round entry, as ``admit`` does;
        a site that signs twice in a round (gossip) leaves its latest digest in the round."""
        public = self.pins.key(receipt.site)
        message = signed_message(EntryKind.UPDATE, receipt.site, receipt.body, None)
        if public is None or not verify_signature(public, receipt.signature, message):
            raise LedgerError(
                len(self.store), Issue.BAD_SIGNATURE, f"site {receipt.site!r}: receipt not signed"
            )
        self._pending.append((receipt.site, receipt))
        self._digests[receipt.site] = digest

    # --- the coordinator's entries ---
    def round(
        self,
        round_idx: int,
        *,
        global_params: Params,
        strategy: str,
        included: Sequence[str],
        rejected: Mapping[str, str],
        privacy: Mapping[str, Any] | None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """``extra``: a paradigm's own round facts (cyclic order, gossip versions, distillation)."""
        n = len(self.store)
        prev = self.head
        batch: list[Entry] = []
        for site, receipt in self._pending:
            entry = make_entry(
                index=n + len(batch),
                prev=prev,
                kind=EntryKind.UPDATE,
                signer=site,
                body=receipt.body,
                signature=receipt.signature,
            )
            batch.append(entry)
            prev = entry.hash
        eps = None if privacy is None else privacy.get("epsilon")
        self._append(
            EntryKind.ROUND,
            before=batch,
            body={
                "round": round_idx,
                "strategy": strategy,
                "aggregate_digest": tensor_digest(global_params),
                "included": sorted(included),
                "rejected": dict(sorted(rejected.items())),
                "update_digests": dict(sorted(self._digests.items())),
                "epsilon": None if eps is None else dict(eps),
                **(extra or {}),
            },
        )
        self._pending, self._digests = [], {}

    def checkpoint(self, round_idx: int, path: Path) -> None:
        self._append(
            EntryKind.CHECKPOINT,
            {
                "round": round_idx,
                "path": path.relative_to(self.run_dir).as_posix(),
                "files": dir_digests(self.run_dir, path),
            },
        )

    def end(
        self,
        *,
        rounds: int,
        global_params: Params,
        final: Path,
        stopped: str | None,
        files: Sequence[Path] = (),
    ) -> None:
        """``files``: more files the run's result rests on (one-shot: the teachers uploaded)."""
        self._append(
            EntryKind.RUN_END,
            {
                "rounds": rounds,
                "final_digest": tensor_digest(global_params),
                "files": {
                    f.relative_to(self.run_dir).as_posix(): file_digest(f) for f in (final, *files)
                },
                "stopped": stopped,
            },
        )
        self.sync_all()


def _changed_keys(pinned: Mapping[str, str], now: Mapping[str, str]) -> str:
    """Why a resumed run cannot continue the chain: whose key is not the one pinned at the start.

    A Flower site without a lasting key (node config ``ledger-dir`` or ``ledger-key``) makes a new
    one per run, so a resumed deployment meets it as a stranger.
    """
    changed = sorted(s for s in set(pinned) | set(now) if pinned.get(s) != now.get(s))
    return (
        f"the run's keys differ from those pinned at its start for {', '.join(changed)}; a resumed "
        "run must be signed by the same coordinator and sites: give the coordinator its key "
        "(ledger.coordinator_key) and each Flower site a lasting one (node config ledger-dir=PATH "
        "or ledger-key=FILE)"
    )
