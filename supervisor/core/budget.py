"""The accounting day and daily budgets.  Pure: the daemon says which day it is.

An engine whose spend today reached its ``daily_budget`` refuses traffic
(``EngineState.refusal``: ``budget_exhausted``): unpinned requests go to the
next engine by priority, pinned ones get the error.  Its waiting requests
move on at once; what it is generating finishes.  When the daemon's day
(its local date) turns, every engine's figures for today start again at
zero and a spent engine serves again.  Each change is logged once and
published on ``engine.budget``.
"""

from __future__ import annotations

from ..logs import get_logger
from .effects import TOPIC_ENGINE_BUDGET, Effects
from .engines import Engines, EngineState
from .router import Router

log = get_logger("supervisor.budget")


class DailyBudgets:
    def __init__(self, engines: Engines, router: Router, effects: Effects) -> None:
        self.engines = engines
        self.router = router
        self.effects = effects
        self.day: str | None = None  # the daemon's first tick names it; until then, figures count towards it

    def spent(self, engine: EngineState, now: float) -> None:
        """A request's cost took the engine's spend today to its budget."""
        budget, spent = engine.config.daily_budget, round(engine.stats.spent_today, 6)
        log.warning(
            "daily budget spent; the engine takes no traffic until the day turns",
            engine=engine.name,
            day=self.day,
            spent_today=spent,
            daily_budget=budget,
        )
        self.effects.publish(
            TOPIC_ENGINE_BUDGET,
            engine=engine.name,
            exhausted=True,
            day=self.day,
            spent_today=spent,
            daily_budget=budget,
        )
        self.router.reroute_queue(engine, now)

    def turn_day(self, day: str, now: float) -> None:
        """The daemon's date now; a new one starts every engine's day afresh."""
        if day == self.day:
            return
        first, self.day = self.day is None, day
        if first:
            return
        for engine in self.engines:
            exhausted = engine.budget_exhausted
            engine.stats.new_day()
            if exhausted:
                log.info(
                    "new day: daily budget renewed; the engine serves again",
                    engine=engine.name,
                    day=day,
                    daily_budget=engine.config.daily_budget,
                )
                self.effects.publish(
                    TOPIC_ENGINE_BUDGET,
                    engine=engine.name,
                    exhausted=False,
                    day=day,
                    spent_today=0.0,
                    daily_budget=engine.config.daily_budget,
                )
