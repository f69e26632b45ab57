"""The aggregator that owns the hot clients dies (SIGKILL) mid-run, two aggregators in one
consumer group and four servers: the other takes its partitions over (after the group's session
timeout), rebuilds them from the usage topic and grants again. The documented bound is the
healthy one, ``L + N*a`` (docs/consistency.md, "Aggregator failover")."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import pytest

from tests.cluster.harness import (
    Cluster,
    GrantTap,
    multipliers,
    ramped_schedule,
    usage_partition,
)

from .common import (
    admissions,
    cold_allowance,
    group_name,
    healthy_bound,
    sleep_until,
    worst_per_client,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 400
#: longer than the takeover (session timeout 6 s + rebalance + rebuild): a new owner that
#: forgot the window would grant on top of admissions still in it, and the test would see it
WINDOW = 10.0
SERVERS = 4
AGGREGATORS = 2
PARTITIONS = 4
CLIENTS = 50
HOT = 5
COLD = 0.005
KILL_AT = 22.0  # seconds into the run
DURATION = 45.0
#: the target for the first grant after the kill
FIRST_GRANT = 10.0


def _wait_assigned(cluster: Cluster, names: list[str], timeout: float = 120.0) -> dict[str, set]:
    """Until every aggregator owns some partitions and together they own them all."""
    deadline = time.monotonic() + timeout
    while True:
        owned = {n: cluster.assigned(n) for n in names}
        if all(owned.values()) and set().union(*owned.values()) == set(range(PARTITIONS)):
            return owned
        assert time.monotonic() < deadline, f"partitions not shared out: {owned}\n" + "\n".join(
            cluster.tail(n) for n in names
        )
        time.sleep(0.2)


@pytest.mark.timeout(DURATION + 240)
def test_aggregator_failover_takeover_time_and_bound(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_cluster: Callable[..., Cluster],
    measured: Callable[[str], None],
) -> None:
    cluster = make_cluster(
        kafka_bootstrap, unique_topic(PARTITIONS), unique_topic(4), LIMIT, WINDOW
    )
    group = group_name()
    aggs = [f"agg-{i}" for i in range(AGGREGATORS)]
    procs = {name: cluster.start_aggregator(name, group=group) for name in aggs}
    owned = _wait_assigned(cluster, aggs)
    # the victim: the aggregator owning most hot clients (client-0, the hottest, on a tie)
    hot_part = [usage_partition(c, PARTITIONS) for c in range(HOT)]
    victim = max(
        aggs, key=lambda n: (sum(p in owned[n] for p in hot_part), hot_part[0] in owned[n])
    )
    survivor = next(n for n in aggs if n != victim)
    lost = [c for c in range(HOT) if hot_part[c] in owned[victim]]
    kept = [c for c in range(HOT) if c not in lost]
    tap = GrantTap(kafka_bootstrap, cluster.grants_topic, HOT)
    try:
        mult = multipliers(CLIENTS)
        schedules = ramped_schedule(13, mult, LIMIT / WINDOW, DURATION, SERVERS, WINDOW)
        start_at = time.time() + 5.0
        names = [f"srv-{s}" for s in range(SERVERS)]
        nodes = [
            cluster.start_node(
                name,
                schedules[s],
                start_at,
                cold_start_allowance=COLD,
                expected_servers=SERVERS,
                watch=HOT,
            )
            for s, name in enumerate(names)
        ]
        sleep_until(start_at + KILL_AT)
        assert owned == {n: cluster.assigned(n) for n in aggs}, "a rebalance before the kill"
        killed = cluster.kill(victim)
        for name, node in zip(names, nodes, strict=True):
            assert node.wait(DURATION + 90) == 0, cluster.tail(name)
    finally:
        tap.close()
    took_over = cluster.assigned(survivor)
    assert cluster.stop(procs[survivor]) == 0, cluster.tail(survivor)
    stats = json.loads((cluster.workdir / f"{survivor}.json").read_text())
    assert stats["errors"] == 0 and stats["malformed"] == 0, stats

    # -- the takeover: the first grant from the survivor for the victim's clients ---------------
    rows = tap.rows()  # (time, aggregator, server, client, tokens)
    surv = tap.aggregators[survivor]
    vic = tap.aggregators[victim]
    after = rows[(rows[:, 0] > killed) & (rows[:, 4] > 0)]
    firsts = {
        c: float(after[(after[:, 1] == surv) & (after[:, 3] == c), 0].min(initial=np.inf) - killed)
        for c in range(HOT)
    }
    last_victim = float(rows[rows[:, 1] == vic, 0].max() - killed)
    first_lost = min(firsts[c] for c in lost)
    # the survivor's own hot clients: the rebalance revokes and rebuilds its partitions too, so
    # they see a gap in grants when the group re-forms (not at the kill)
    gaps_kept = {}
    for c in kept:
        g = np.sort(after[(after[:, 1] == surv) & (after[:, 3] == c), 0])
        g = np.concatenate(([killed], g))
        gaps_kept[c] = float(np.diff(g).max()) if g.size > 1 else float("inf")

    # -- the bound over the whole run, and the windows around the failover ----------------------
    stamps, clients = admissions(cluster, names)
    a = cold_allowance(LIMIT, COLD)
    bound = healthy_bound(LIMIT, SERVERS, a)
    worst = worst_per_client(stamps, clients, CLIENTS, WINDOW)
    near = (stamps > killed - WINDOW) & (stamps < killed + first_lost + WINDOW)
    worst_near = worst_per_client(stamps[near], clients[near], HOT, WINDOW)
    before = worst_per_client(stamps[stamps <= killed], clients[stamps <= killed], HOT, WINDOW)
    # admitted per hot client in the window that ends as the first grant arrives (the dip)
    dip_end = killed + first_lost
    dip = np.bincount(
        clients[(stamps > dip_end - WINDOW) & (stamps <= dip_end)], minlength=CLIENTS
    )[:HOT]

    measured(
        f"aggregator failover: {victim} (owned partitions {sorted(owned[victim])}, hot clients "
        f"{lost}) SIGKILLed {KILL_AT:g} s into a {DURATION:g} s run; {survivor} owned "
        f"{sorted(owned[survivor])}, then {sorted(took_over)}; limit {LIMIT}/{WINDOW:g}s, "
        f"{SERVERS} servers"
    )
    measured(
        f"first grant after the kill (s): {', '.join(f'client-{c} {firsts[c]:.2f}' for c in lost)}"
        f" (victim's clients; target {FIRST_GRANT:g} s); longest gap between grants for the "
        f"survivor's own: {', '.join(f'client-{c} {v:.2f}' for c, v in gaps_kept.items())} s; "
        f"the victim's last grant {last_victim:.2f} s; replayed {stats.get('replayed_records')} "
        f"records in {stats.get('rebuilds')} rebuilds"
    )
    measured(
        f"bound L + N*a = {LIMIT} + {SERVERS}*{a} = {bound}; worst window over the run "
        f"{worst.max()} (hot: {worst[:HOT].tolist()}), around the failover "
        f"{worst_near.tolist()} (before it {before.tolist()}); admitted in the window ending at "
        f"the first grant {dip.tolist()} ({dip.min() / LIMIT:.0%}..{dip.max() / LIMIT:.0%} of L)"
    )
    assert sorted(took_over) == list(range(PARTITIONS)), took_over
    assert worst.max() <= bound, worst
    assert first_lost <= FIRST_GRANT, firsts
    assert all(v <= FIRST_GRANT for v in firsts.values()), firsts
    assert all(v <= FIRST_GRANT for v in gaps_kept.values()), gaps_kept
