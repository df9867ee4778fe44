"""The verifier's hand-over rules (medfed.audit.lineage) on hand-built stories, and the rule that
only a resume may follow a run's end."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from medfed.audit.canonical import canonical_json
from medfed.audit.keys import new_key, public_hex
from medfed.audit.ledger import COORDINATOR, GENESIS, EntryKind, Issue, make_entry
from medfed.audit.lineage import Lineage
from medfed.audit.verify import walk_chain
from medfed.topologies import gossip
from medfed.types import Paradigm


def _start(sites):
    return {"paradigm": "gossip", "sites": sites, "initial_digest": "init"}


def _honest_steps(sites, picks):
    """Gossip bodies as the real pull/bump bookkeeping produces them; digest = 'site@version'."""
    state, out = gossip.GossipState.start(sites), []
    digest = {s: "init" for s in sites}
    for step, i in enumerate(picks):
        site = sites[i]
        peers = gossip.pull(state, site)
        v = state.versions[site]
        out.append(
            {
                "topology": "gossip",
                "round": step // len(sites),
                "step": step,
                "site": site,
                "from_version": v,
                "from_digest": digest[site],
                "merged": [
                    {"site": p, "version": state.versions[p], "digest": digest[p]} for p in peers
                ],
                "version": v + 1,
                "digest": f"{site}@{v + 1}",
            }
        )
        state = gossip.bump(state, site, peers)
        digest[site] = f"{site}@{v + 1}"
    return out, state


@given(
    n=st.integers(2, 4),
    picks=st.lists(st.integers(0, 3), min_size=2, max_size=12),
    which=st.integers(0, 100),
    delta=st.sampled_from([-1, 1]),
)
def test_gossip_lineage_accepts_the_honest_story_and_catches_any_forked_merge(
    n, picks, which, delta
):
    sites = [f"s{i}" for i in range(n)]
    steps, final = _honest_steps(sites, [p % n for p in picks])
    lineage = Lineage.from_start(_start(sites))
    assert lineage is not None and lineage.repeats
    assert all(lineage.update(s) is None for s in steps)
    assert lineage.state.models == {
        s: (final.versions[s], lineage.state.models[s][1]) for s in sites
    }
    merging = [i for i, s in enumerate(steps) if s["merged"]]
    if not merging:
        return
    k = merging[which % len(merging)]
    forked = json.loads(json.dumps(steps))
    forked[k]["merged"][0]["version"] += delta  # a version of that peer the chain never had
    lineage = Lineage.from_start(_start(sites))
    assert lineage is not None
    found = [lineage.update(s) for s in forked]
    assert all(f is None for f in found[:k])
    assert found[k] is not None and found[k][0] is Issue.OUT_OF_ORDER and "fork" in found[k][1]


def test_client_server_ledgers_have_no_lineage_and_a_wrong_version_vector_is_named():
    assert Lineage.from_start({"sites": ["a"], "strategy": "fedavg"}) is None
    steps, _ = _honest_steps(["a", "b"], [0, 1])
    lineage = Lineage.from_start(_start(["a", "b"]))
    assert lineage is not None and lineage.paradigm is Paradigm.GOSSIP
    for s in steps:
        assert lineage.update(s) is None
    bad = lineage.round({"topology": "gossip", "round": 0, "versions": {"a": 1, "b": 2}})
    assert bad is not None and bad[0] is Issue.OUT_OF_ORDER
    assert lineage.round({"topology": "gossip", "round": 0, "versions": {"a": 1, "b": 1}}) is None


def _hop(r, i, site, sender, start, receiver):
    return {
        "topology": "cyclic",
        "round": r,
        "hop": i,
        "site": site,
        "sender": sender,
        "start_digest": start,
        "receiver": receiver,
        "digest": f"{site}{r}",
    }


def _cycle_round(r, order, rejected=()):
    return {"topology": "cyclic", "round": r, "order": order, "rejected": dict.fromkeys(rejected)}


def test_cyclic_lineage_follows_the_receiver_across_cycles_and_to_the_end():
    start = {"paradigm": "cyclic", "sites": ["a", "b"], "initial_digest": "i"}
    cycle0 = [_hop(0, 0, "a", None, "i", "b"), _hop(0, 1, "b", "a", "a0", "b")]
    cycle1 = [_hop(1, 0, "b", "b", "b0", "a"), _hop(1, 1, "a", "b", "b1", None)]  # shuffled
    lineage = Lineage.from_start(start)
    assert lineage is not None and not lineage.repeats
    assert [lineage.update(h) for h in cycle0] == [None, None]
    assert lineage.round(_cycle_round(0, ["a", "b"])) is None
    assert [lineage.update(h) for h in cycle1] == [None, None]
    assert lineage.round(_cycle_round(1, ["b", "a"])) is None and lineage.end() is None
    # cycle 1 starting anywhere but where cycle 0 sent the model is named
    lineage = Lineage.from_start(start)
    assert lineage is not None
    for h in cycle0:
        lineage.update(h)
    lineage.round(_cycle_round(0, ["a", "b"]))
    lineage.update(_hop(1, 0, "a", "b", "b0", "b"))
    bad = lineage.round(_cycle_round(1, ["a", "b"]))
    assert bad is not None and "handed the model to 'b'" in bad[1]
    # a hand-over after the last cycle, and a site neither hopped nor rejected
    lineage = Lineage.from_start(start)
    assert lineage is not None
    for h in cycle0:
        lineage.update(h)
    assert lineage.round(_cycle_round(0, ["a", "b"])) is None
    assert lineage.end() is not None
    lineage = Lineage.from_start(start)
    assert lineage is not None and lineage.update(cycle0[0]) is None
    missing = lineage.round(_cycle_round(0, ["a", "b"]))
    assert missing is not None and "['b']" in missing[1]
    lineage.resume(-1)  # back to the initial model: the same first hop is accepted again
    assert lineage.update(cycle0[0]) is None
    assert lineage.round(_cycle_round(0, ["a", "b"], rejected=["b"])) is None


def test_after_the_run_end_only_a_resume_may_follow():
    """A hand-built chain: run_end, resume, run_end verifies; a round after run_end does not."""
    key = new_key()

    def chain(*kinds):
        out = []
        for kind, body in kinds:
            out.append(
                make_entry(
                    index=len(out),
                    prev=out[-1].hash if out else GENESIS,
                    kind=kind,
                    signer=COORDINATOR,
                    body=canonical_json({"run_id": "r", **body}),
                    key=key,
                )
            )
        return out

    start = (EntryKind.RUN_START, {"keys": {COORDINATOR: public_hex(key)}, "sites": []})
    end = (EntryKind.RUN_END, {"rounds": 0, "files": {}})
    reopen = (EntryKind.RESUME, {"from_round": -1, "superseded_rounds": []})
    problem, state = walk_chain(chain(start, end, reopen, end))
    assert problem is None and state.run_end is not None and state.run_end[0] == 3
    late = (EntryKind.ROUND, {"round": 0, "included": [], "update_digests": {}, "rejected": {}})
    problem, _ = walk_chain(chain(start, end, late))
    assert problem is not None and (problem.index, problem.issue) == (2, Issue.OUT_OF_ORDER)
    assert "after the run ended" in problem.detail
