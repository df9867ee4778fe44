"""The ``ledger`` section of a run config."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class LedgerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, description="write RUN_DIR/ledger: a signed, hash-chained record of every update"
    )
    coordinator_key: Path | None = Field(
        None,
        description="the coordinator's Ed25519 private key (`medfed keys new`); default: one "
        "generated for the run under RUN_DIR/keys (proves the file's integrity, not identity)",
    )
    replicas: bool = Field(
        True,
        description="simulation: every site keeps and checks its own replica file (cost grows "
        "with sites x entries per round); false: the simulated sites share one in-memory copy "
        "(for federations of hundreds of sites)",
    )
    site_keys: dict[str, Path] | None = Field(
        None,
        description="simulation only: site -> Ed25519 private key path; sites not named get a "
        "key generated under RUN_DIR/keys. Over Flower each site holds its own key",
    )
