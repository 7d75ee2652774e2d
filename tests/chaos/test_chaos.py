"""Nothing lost, nothing twice: a seeded schedule of kills against the simulator's truth.

Simulator → two agents (deadband 0, polling every 250 ms, no heartbeats) → Mosquitto
(the generated site config) → hub, all real processes. The schedule SIGKILLs the broker
and the agents and SIGTERMs and SIGKILLs the hub; then every value the simulator served
to the agents is matched against the hub's history (tests/chaos/ledger.py):

* no sample stored twice, and no stored sample that no read explains;
* no served change lost, except reads an agent SIGKILL caught in its pre-commit window
  (read, not yet committed to the agent's buffer: docs/agent.md, "Pre-commit window");
* the twin's current state is the newest history sample of every attribute.

What is asserted never depends on timing: the schedule's times only decide what
happens, and every wait for the site to settle has a generous limit. The figures (and
the RSS of hub and agents over time) are printed in the terminal summary. ``--soak
MINUTES`` runs the long schedule for release checks (docs/reliability.md).
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest

from chaos import figures
from chaos.site import (
    FLUSH_MS,
    GATEWAYS,
    POLL_MS,
    ChaosSite,
    RssSampler,
    Schedule,
    machine,
    memory_growth,
    report_json,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos_run]

CI_SEED = 20251125
CI_DURATION_S = 60.0
CI_COUNTS = {"broker_kill": 3, "agent_kill": 3, "hub_term": 1, "hub_kill": 1}


def soak_counts(minutes: float) -> dict[str, int]:
    every_5_min = max(2, int(minutes // 5))
    return {"broker_kill": every_5_min, "agent_kill": every_5_min, "hub_term": 1, "hub_kill": 1}


def test_nothing_lost_nothing_twice(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    soak = request.config.getoption("--soak", default=None)
    seed = request.config.getoption("--chaos-seed", default=None) or CI_SEED
    gateways = list(GATEWAYS)
    if soak:
        # one agent is never killed, so its memory is measured over the whole soak
        schedule = Schedule.seeded(seed, soak * 60, soak_counts(soak), gateways, spare={"gw-field"})
    else:
        schedule = Schedule.seeded(seed, CI_DURATION_S, CI_COUNTS, gateways)
    site = ChaosSite(tmp_path, seed)
    began = time.monotonic()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    sampler = RssSampler(site, interval=10.0 if soak else 1.0)
    try:
        site.start()
        sampler.start()
        done = site.play(schedule)
        sampler.stop()
        ended = site.settle()
    except BaseException:
        sampler.stop()
        site.stop_all()
        raise
    verdict, state_problems = site.reckon(ended["twin"])

    memory = memory_growth(sampler.samples, warmup_s=60.0 if soak else 10.0)
    figures_ = {
        "run": "soak" if soak else "ci",
        "when": when,
        "machine": machine(),
        "seed": seed,
        "chaos_s": schedule.duration_s,
        "wall_s": round(time.monotonic() - began, 1),
        "events": done,
        "agents": {"poll_ms": POLL_MS, "flush_ms": FLUSH_MS, "deadband": 0},
        **verdict.summary(),
        "state_mismatches": len(state_problems),
        "memory": memory,
    }
    lines = [
        f"chaos {figures_['run']} run, {when}, {figures_['machine']}, seed {seed}",
        f"  schedule: {schedule.duration_s:g} s of chaos, events {done}",
        *(f"    {line}" for line in site.log),
        f"  served reads {verdict.reads}, changes {verdict.changes}, stored samples "
        f"{verdict.stored}, matched {verdict.matched}",
        f"  duplicates {len(verdict.duplicates)}, unmatched {len(verdict.unmatched)}, "
        f"lost outside the window {len(verdict.lost)}, lost in the pre-commit window "
        f"{len(verdict.lost_in_window)} (latest read lost: "
        f"{verdict.window_ms if verdict.window_ms is not None else '-'} ms before its SIGKILL)",
        f"  current state = newest history sample: {len(state_problems)} mismatches",
        *(
            f"  rss {role}: {m['rss_mib_start']} -> {m['rss_mib_end']} MiB (max "
            f"{m['rss_mib_max']}) over {m['longest_life_s']} s, growth "
            f"{m.get('growth_mib_per_hour', '-')} MiB/h fitted over {m.get('fitted_over_s', '-')} s"
            f", {m['processes']} processes"
            for role, m in memory.items()
        ),
        "  " + report_json(figures_),
    ]
    figures.add(request.config, "\n".join(lines))

    assert ended["served_rows_dropped"] == 0, "the simulator dropped served rows: no truth"
    assert sum(done.values()) == len(schedule.events)
    assert verdict.changes > 100 * len(GATEWAYS), "too few reads to judge"
    assert verdict.duplicates == [], verdict.duplicates[:20]
    assert verdict.unmatched == [], verdict.unmatched[:20]
    assert verdict.lost == [], verdict.lost[:20]
    assert state_problems == [], state_problems[:20]
    assert verdict.matched + len(verdict.lost_in_window) >= verdict.changes
