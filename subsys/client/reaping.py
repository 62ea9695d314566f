"""Reap listed zombies one API call each, for the CLI and the console.

One call per zombie (the node re-checks each one's evidence when it acts) so
a person can watch the progress and learn, per action, what was done, what
failed and why, and what was no longer needed: healed meanwhile, or fixed by
an earlier action of the same reap (a destroyed session takes its keys with
it). A missing or refused token is the same for every zombie, so it is raised
once; no node answering stops the reap, since it is unknown what was done.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Sequence

from subsys.client.admin import AdminError, Forbidden, NotFound, Unauthorized, Unreachable
from subsys.core import admin as api

__all__ = ["GONE", "Reaping"]

GONE = "gone before its turn (healed meanwhile, or fixed by an earlier action of this reap): nothing done"


class Reaping:
    """The reap of ``found``, in order; ``outcomes`` grows as it goes (read it for progress)."""

    def __init__(self, found: Sequence[api.Zombie], reap: Callable[[list[str]], Awaitable[api.ReapResult]], *,
                 unsure_hint: str, on_next: Callable[[Reaping], None] | None = None) -> None:  # fmt: skip
        self.found = list(found)
        self.outcomes: list[api.ReapOutcome] = []
        self.index = 0
        self._reap, self._unsure_hint, self._on_next = reap, unsure_hint, on_next

    @property
    def current(self) -> api.Zombie:
        return self.found[self.index]

    @property
    def done(self) -> int:
        return sum(o.done for o in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if not o.done and o.detail.startswith("failed"))

    async def run(self) -> api.ReapResult:
        for self.index, zombie in enumerate(self.found):
            if self._on_next is not None:
                self._on_next(self)
            try:
                self.outcomes += (await self._reap([zombie.id])).outcomes
            except NotFound:
                self._skip(zombie, GONE)
            except (Unauthorized, Forbidden):
                raise
            except Unreachable as exc:
                self._skip(zombie, f"failed: no node answered ({exc.message}); it may have been done: "
                                   f"{self._unsure_hint}")  # fmt: skip
                for rest in self.found[self.index + 1:]:
                    self._skip(rest, "failed: not attempted: no node answered")
                break
            except AdminError as exc:
                self._skip(zombie, f"failed: {exc.code}: {exc.message}")
        return self.result()

    def result(self) -> api.ReapResult:
        done, failed = self.done, self.failed
        return api.ReapResult(dry_run=False, outcomes=self.outcomes, reaped=done, failed=failed,
                              skipped=len(self.outcomes) - done - failed)  # fmt: skip

    def _skip(self, zombie: api.Zombie, detail: str) -> None:
        self.outcomes += [api.ReapOutcome(id=zombie.id, kind=zombie.kind, subject=zombie.subject, action=action,
                                          done=False, detail=detail) for action in zombie.actions]  # fmt: skip
