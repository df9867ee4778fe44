"""privacy.he over Flower: sites encrypt and decrypt, the ServerApp sums ciphertexts only."""

from __future__ import annotations

import json
import math
import stat
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, RecordDict  # noqa: E402

from medfed.audit.site import update_digest  # noqa: E402
from medfed.cli import main as cli_main  # noqa: E402
from medfed.config import ConfigError, build_config  # noqa: E402
from medfed.privacy.config import HEOptions  # noqa: E402
from medfed.privacy.he import (  # noqa: E402
    EncryptedAggregate,
    HEKeys,
    context_info,
    decrypt_aggregate,
    he_fedavg,
    public_context_of,
    setup_keys,
)
from medfed.runtime.flower.codec import (  # noqa: E402
    Key,
    from_record,
    to_record,
    update_content,
    update_from_content,
)
from medfed.runtime.flower.he import (  # noqa: E402
    DECRYPT_MESSAGE,
    ENCRYPT_METRIC,
    GROUP,
    PUBLIC_FILE,
    SECRET_FILE,
    FlowerEncryptedAggregation,
    HEContextError,
    HEKey,
    HEProtocolError,
    UpdateScreened,
    agreed_public_context,
    decrypt_reply,
    pack,
    seal_update,
    site_contexts,
    site_secret_context,
    unpack,
    write_keys,
)
from medfed.types import ParamKind, Params, StrategyState, Update  # noqa: E402

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keys() -> HEKeys:
    return setup_keys()


def _global() -> Params:
    return {
        "w": torch.tensor([[0.5, -1.0], [2.0, 0.25], [0.0, 1.5]]),
        "b": torch.tensor([0.1, -0.2]),
        "bn.num_batches_tracked": torch.tensor(4),
    }


def _updates() -> list[Update]:
    """Three sites of 1, 2 and 5 examples; one sends a delta, as DP's wrappers may."""
    g = _global()
    return [
        Update(
            "site1",
            {"w": g["w"] + 1.0, "b": g["b"] * 2, "bn.num_batches_tracked": torch.tensor(6)},
            ParamKind.WEIGHTS,
            1,
            {"train_loss": 0.7},
        ),
        Update(
            "site2",
            {"w": g["w"] - 0.5, "b": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(8)},
            ParamKind.WEIGHTS,
            2,
            {"train_loss": 0.6},
        ),
        Update(
            "site3",
            {
                "w": torch.full((3, 2), 0.25),
                "b": torch.tensor([1.0, 1.0]),
                "bn.num_batches_tracked": torch.tensor(2),
            },
            ParamKind.DELTA,
            5,
            {"train_loss": 0.5},
        ),
    ]


def _by_hand() -> Params:
    """(1 * w1 + 2 * w2 + 5 * (g + d3)) / 8, written out."""
    g = _global()
    w = (1 * (g["w"] + 1.0) + 2 * (g["w"] - 0.5) + 5 * (g["w"] + 0.25)) / 8
    b = (1 * torch.tensor([0.2, -0.4]) + 0 + 5 * torch.tensor([1.1, 0.8])) / 8
    return {"w": w, "b": b, "bn.num_batches_tracked": torch.tensor(round((6 + 16 + 5 * 6) / 8))}


def _seal_all(keys: HEKeys, updates: list[Update]) -> list[Update]:
    """What the server receives: each sealed update after a round trip through the codec."""
    out = []
    for u in updates:
        sealed = seal_update(
            u, global_params=_global(), expected_keys=None, public_context=keys.public_context
        )
        out.append(update_from_content(u.site, update_content(sealed)))
    return out


class _Sites:
    """A fake ``FlowerRuntime._exchange``: the named sites answer decrypt requests with the
    real site handler; ``silent`` sites do not answer."""

    def __init__(self, secret: bytes, *, silent: tuple[str, ...] = ()) -> None:
        self.secret, self.silent = secret, silent
        self.asked: list[str] = []

    def __call__(self, kind, round_idx, sites, content):
        assert kind == DECRYPT_MESSAGE and len(sites) == 1
        site = sites[0]
        self.asked.append(site)
        if site in self.silent:
            return {site: "no reply within 5 s (dropped out?)"}
        return {site: SimpleNamespace(content=decrypt_reply(content(), secret_context=self.secret))}


def _server(keys: HEKeys, sites: _Sites) -> FlowerEncryptedAggregation:
    return FlowerEncryptedAggregation(
        keys.public_context, send=sites, task=lambda r: ConfigRecord({"round": r})
    )


# --------------------------------------------------------------------------- the round


def test_round_matches_hand_computed_mean_and_the_simulator(keys):
    ups = _seal_all(keys, _updates())
    for u in ups:  # nothing floating leaves a site in clear
        assert all(not t.is_floating_point() for t in u.params.values())
        assert set(u.extras) == {GROUP}
        assert all(t.dtype == torch.uint8 for t in u.extras[GROUP].values())
        assert u.metrics[ENCRYPT_METRIC] > 0 and u.metrics["train_loss"] > 0
    sites = _Sites(keys.secret_context)
    server = _server(keys, sites)
    g = _global()
    for u in ups:
        assert server.validate(u, g, expected_keys=None, max_relative_norm=1.0) is None
    new, state, record = server.aggregate(g, ups, StrategyState(round=3))
    assert state.round == 4 and sites.asked == ["site1"]
    ref = _by_hand()
    sim, _ = he_fedavg(g, _updates(), keys=keys, expected_keys=None)
    for k, v in ref.items():
        assert new[k].dtype == g[k].dtype
        if v.is_floating_point():
            assert (new[k].double() - v.double()).abs().max().item() <= 1e-6, k
            assert (new[k].double() - sim[k].double()).abs().max().item() <= 1e-6, k
        else:
            assert new[k].item() == v.item() == sim[k].item(), k
    assert record["decrypt_site"] == "site1"
    chunk_bytes = sum(
        len(t) for u in ups for n, t in u.extras[GROUP].items() if n.startswith("chunk")
    )
    assert record["bytes_up"] == chunk_bytes + 3 * 8  # ciphertext + three int64 counters
    assert record["plaintext_bytes"] == 3 * (8 * 4 + 8)  # eight float32 and one int64 per site
    assert record["expansion"] > 100  # one ciphertext (~300 kB) per site for 40 bytes
    assert record["encrypt_s"] == pytest.approx(sum(u.metrics[ENCRYPT_METRIC] for u in ups))
    assert record["aggregate_s"] > 0 and record["decrypt_s"] > 0


def test_keys_a_strategy_keeps_at_the_site_keep_the_global_value(keys):
    """FedBN uploads a subset of the model: only that subset is encrypted, summed and merged."""
    uploaded = frozenset({"w", "bn.num_batches_tracked"})
    ups = [replace(u, params={k: u.params[k] for k in uploaded}) for u in _updates()]
    g = _global()
    sealed = []
    for u in ups:
        s = seal_update(
            u, global_params=g, expected_keys=uploaded, public_context=keys.public_context
        )
        sealed.append(update_from_content(u.site, update_content(s)))
    server = _server(keys, _Sites(keys.secret_context))
    assert all(
        server.validate(u, g, expected_keys=uploaded, max_relative_norm=1.0) is None for u in sealed
    )
    assert "'b'" in str(
        server.validate(
            _seal_all(keys, _updates())[0], g, expected_keys=uploaded, max_relative_norm=1.0
        )
    )
    new, _, _ = server.aggregate(g, sealed, StrategyState())
    assert torch.equal(new["b"], g["b"])  # kept at the sites, never sent
    assert (new["w"] - _by_hand()["w"]).abs().max().item() <= 1e-6
    assert new["bn.num_batches_tracked"].item() == _by_hand()["bn.num_batches_tracked"].item()


def test_a_silent_site_is_skipped_and_no_decryption_fails_the_round(keys):
    ups = _seal_all(keys, _updates())
    sites = _Sites(keys.secret_context, silent=("site1",))
    _, _, record = _server(keys, sites).aggregate(_global(), ups, StrategyState())
    assert sites.asked == ["site1", "site2"] and record["decrypt_site"] == "site2"
    nobody = _Sites(keys.secret_context, silent=("site1", "site2", "site3"))
    with pytest.raises(HEProtocolError, match="no site decrypted.*site3: no reply"):
        _server(keys, nobody).aggregate(_global(), ups, StrategyState())


def test_the_server_holds_only_the_public_context_and_cannot_decrypt(keys):
    server = _server(keys, _Sites(keys.secret_context))
    info = context_info(server.public_context)
    assert not info.private and info.matches(HEOptions())
    agg = EncryptedAggregate(("site1",), 1, *unpack(_seal_all(keys, _updates())[0].extras[GROUP]))
    with pytest.raises(ValueError, match="holds no secret key"):
        decrypt_aggregate(agg, secret_context=server.public_context)
    with pytest.raises(HEProtocolError, match="never hold the CKKS secret key"):
        FlowerEncryptedAggregation(keys.secret_context, send=_Sites(b""), task=ConfigRecord)


def test_the_site_screens_before_encrypting(keys):
    bad = _updates()[0]
    bad = Update(bad.site, {**bad.params, "b": torch.tensor([float("nan"), 0.0])}, bad.kind, 1)
    with pytest.raises(UpdateScreened, match="site1.*'b' has 1 non-finite"):
        seal_update(
            bad, global_params=_global(), expected_keys=None, public_context=keys.public_context
        )
    short = Update("site1", {"w": _global()["w"]}, ParamKind.WEIGHTS, 1)
    with pytest.raises(UpdateScreened, match="missing tensors"):
        seal_update(
            short, global_params=_global(), expected_keys=None, public_context=keys.public_context
        )


def test_the_server_refuses_uploads_it_cannot_sum(keys):
    server = _server(keys, _Sites(keys.secret_context))
    g = _global()
    good = _seal_all(keys, _updates())[0]
    layout, chunks = unpack(good.extras[GROUP])

    def check(u: Update) -> str | None:
        return server.validate(u, g, expected_keys=None, max_relative_norm=1.0)

    assert "encrypted update: 2 ciphertext chunks, expected 1" in str(
        check(
            Update(good.site, good.params, good.kind, 1, extras={GROUP: pack(layout, chunks * 2)})
        )
    )
    # a site whose model has another shape: the layout names the tensor
    other = seal_update(
        Update("x", {**_updates()[0].params, "b": torch.zeros(3)}, ParamKind.WEIGHTS, 1),
        global_params={**g, "b": torch.zeros(3)},
        expected_keys=None,
        public_context=keys.public_context,
    )
    assert "'b' has shape (3,), expected (2,)" in str(check(other))
    assert "expected extras group 'he'" in str(check(Update("x", good.params, good.kind, 1)))
    assert "unreadable ciphertext layout" in str(
        check(Update("x", good.params, good.kind, 1, extras={GROUP: {"layout": torch.zeros(3)}}))
    )
    assert "num_examples must be positive" in str(
        check(Update("x", good.params, good.kind, 0, extras=good.extras))
    )


def test_the_ledger_signs_the_ciphertext_that_arrives(keys):
    sealed = seal_update(
        _updates()[1],
        global_params=_global(),
        expected_keys=None,
        public_context=keys.public_context,
    )
    received = update_from_content("site2", update_content(sealed))
    # what the site signs is what the coordinator recomputes, ciphertext bytes included
    assert update_digest(received) == update_digest(sealed)
    tampered = dict(received.extras[GROUP])
    tampered["chunk.000000"] = tampered["chunk.000000"].clone()
    tampered["chunk.000000"][100] ^= 1
    assert update_digest(Update("site2", received.params, received.kind, 2, received.metrics,
                                {GROUP: tampered})) != update_digest(sealed)  # fmt: skip


# --------------------------------------------------------------------------- setup and refusals


def test_keys_command_writes_a_private_secret_and_never_overwrites(tmp_path, capsys):
    assert cli_main(["he", "keys", "--out", str(tmp_path)]) == 0
    secret, public = tmp_path / SECRET_FILE, tmp_path / PUBLIC_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert context_info(secret.read_bytes()).private
    assert not context_info(public.read_bytes()).private
    assert public_context_of(secret.read_bytes()) == public.read_bytes()
    assert cli_main(["he", "keys", "--out", str(tmp_path)]) == 1
    said = capsys.readouterr()
    assert "refusing to overwrite" in " ".join((said.out + said.err).split())
    with pytest.raises(FileExistsError):
        write_keys(tmp_path)
    # parameters come from a run config's privacy.he; a config without it is an error
    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    assert cli_main(["he", "keys", "--out", str(tmp_path / "q"), "--config", str(quickstart)]) == 1
    said = capsys.readouterr()
    assert "privacy.he is not set" in " ".join((said.out + said.err).split())
    assert not (tmp_path / "q").exists()


def test_a_site_without_its_secret_context_refuses_naming_the_node_config_key(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("MEDFED_HE_CONTEXT", raising=False)
    with pytest.raises(HEContextError, match="--node-config \"he-context='PATH'\""):
        site_secret_context({})
    with pytest.raises(HEContextError, match="no such file"):
        site_secret_context({"he-context": str(tmp_path / "nope.ctx")})
    files = write_keys(tmp_path)
    with pytest.raises(HEContextError, match="holds no secret key"):
        site_secret_context({"he-context": str(files.public)})
    monkeypatch.setenv("MEDFED_HE_CONTEXT", str(files.secret))
    secret, public = site_contexts({})
    assert secret == files.secret.read_bytes() and public == files.public.read_bytes()


def test_sites_must_present_one_public_context_made_with_the_run_parameters(keys):
    other = setup_keys()
    opts = HEOptions()
    pub = keys.public_context
    assert agreed_public_context({"a": pub, "b": pub}, options=opts) == pub
    with pytest.raises(HEProtocolError, match=r"different CKKS key pairs .*: a, c; b"):
        agreed_public_context({"a": pub, "b": other.public_context, "c": pub}, options=opts)
    with pytest.raises(HEProtocolError, match="site.s. b presented no CKKS public context"):
        agreed_public_context({"a": pub, "b": None}, options=opts)
    with pytest.raises(HEProtocolError, match="holding the secret key"):
        agreed_public_context({"a": keys.secret_context}, options=opts)
    big = HEOptions(poly_modulus_degree=16384)
    with pytest.raises(HEProtocolError, match="poly_modulus_degree=8192.*asks for 16384"):
        agreed_public_context({"a": pub}, options=big)


@pytest.mark.parametrize("strategy", ["scaffold", "fedadam", "krum"])
def test_strategies_that_are_not_a_plain_mean_are_refused_at_config_time(strategy):
    with pytest.raises(ConfigError, match="plain weighted mean"):
        build_config({"federation": {"strategy": {"name": strategy}}, "privacy": {"he": {}}}, [])


# --------------------------------------------------------------------------- one simulation


@pytest.mark.slow
def test_flower_he_run_matches_the_simulator_and_plaintext(tmp_path, monkeypatch):
    """One Flower simulation (Ray's start-up is paid once): three SuperNodes share a key pair
    from the setup step, the ServerApp only ever handles ciphertext and the public context, and
    the model equals the in-process HE run's and the plaintext run's; the ledger verifies."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs ray (flwr[simulation])")
    from flwr.simulation import run_simulation
    from safetensors.torch import load_file

    from medfed.audit.verify import verify_run
    from medfed.engine import load_federation, run
    from medfed.runtime.flower import client
    from medfed.runtime.flower.server import server_app

    def config(*extra: str):
        return build_config(
            {},
            [
                "data.ultrasound.scale=0.03",
                "data.ultrasound.num_sites=3",
                "data.ultrasound.image_size=32",
                f"data.cache_dir={tmp_path / 'cache'}",
                "model.name=medfed:tinycnn",
                "train.batch_size=16",
                "federation.rounds=2",
                "federation.min_clients=3",
                "device=cpu",
                *extra,
            ],
        )

    he_cfg, clear_cfg = config("privacy.he={}"), config()
    fed, _ = load_federation(he_cfg.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Flower's simulation runs each client with one thread
    try:
        sim = run(he_cfg, out_dir=tmp_path / "inproc-he", federation=fed, progress=False)
        clear = run(clear_cfg, out_dir=tmp_path / "inproc", federation=fed, progress=False)
    finally:
        torch.set_num_threads(threads)

    files = write_keys(tmp_path / "he-keys")
    monkeypatch.setenv("MEDFED_HE_CONTEXT", str(files.secret))  # every SuperNode's node config
    sites_dir = tmp_path / "sites"
    monkeypatch.setenv("MEDFED_LEDGER_DIR", str(sites_dir))
    seen: list[tuple[str, dict[str, torch.dtype], list[str]]] = []
    contexts: list[bytes] = []
    original = FlowerEncryptedAggregation.validate

    def spy(self, update, global_params, **kw):
        seen.append(
            (update.site, {k: t.dtype for k, t in update.params.items()}, list(update.extras))
        )
        contexts.append(self.public_context)
        return original(self, update, global_params, **kw)

    monkeypatch.setattr(FlowerEncryptedAggregation, "validate", spy)
    app = server_app(he_cfg, out_dir=tmp_path / "flower", num_sites=3, timeout=300, progress=False)
    run_simulation(
        server_app=app,
        client_app=client.app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    ours = load_file(str(tmp_path / "flower" / "final.safetensors"))
    assert ours.keys() == sim.final_params.keys()
    for k, v in sim.final_params.items():
        if not v.is_floating_point():
            assert torch.equal(ours[k], v) and torch.equal(ours[k], clear.final_params[k]), k
            continue
        for ref in (v, clear.final_params[k]):
            rel = (ours[k].double() - ref.double()).norm() / max(ref.double().norm(), 1e-12)
            assert rel.item() < 1e-4, (k, rel.item())
    # the ServerApp saw ciphertext and integer counters only, with the sites' public context
    assert len(seen) == 6 and {s for s, _, _ in seen} == {"site1", "site2", "site3"}
    for _, dtypes, extras in seen:
        assert extras == [GROUP] and not any(d.is_floating_point for d in dtypes.values())
    assert {c for c in contexts} == {files.public.read_bytes()}
    rows = [json.loads(x) for x in (tmp_path / "flower" / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and all(not r["rejected"] for r in rows)
    for row, ref in zip(rows, sim.history, strict=True):
        he = row["extra"]["he"]
        assert he["bytes_up"] == row["bytes_up"] > 10 * he["plaintext_bytes"]
        # the same number of ciphertexts as the simulator's (compressed sizes vary a little)
        assert he["bytes_up"] == pytest.approx(ref["extra"]["he"]["bytes_up"], rel=1e-2)
        assert he["plaintext_bytes"] == ref["extra"]["he"]["plaintext_bytes"]
        assert he["decrypt_site"] in {"site1", "site2", "site3"}
        assert min(he["encrypt_s"], he["aggregate_s"], he["decrypt_s"]) > 0
        assert math.isfinite(row["val_auc"])
    verdict = verify_run(tmp_path / "flower", replicas=[sites_dir])
    assert verdict.ok, [p.describe() for p in verdict.problems]
    assert len(verdict.replicas) == 3


def test_decrypt_reply_is_the_site_handler_body(keys):
    """The ClientApp's ``he_decrypt`` is this function on the message content: the plaintext
    mean of what the server summed, in float64."""
    ups = _seal_all(keys, _updates()[:2])
    layout, chunks = unpack(ups[0].extras[GROUP])
    content = RecordDict({HEKey.AGGREGATE: to_record(pack(layout, chunks))})
    reply = decrypt_reply(content, secret_context=keys.secret_context)
    w = from_record(reply.array_records[Key.PARAMS])["w"]
    assert w.dtype == torch.float64
    assert (w - (_global()["w"].double() + 1.0)).abs().max().item() <= 1e-6
