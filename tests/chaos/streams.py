"""Synthetic event streams for the chaos checkers' unit tests (recorded-shape events, fake times)."""

from __future__ import annotations

from typing import Any


class Stream:
    def __init__(self) -> None:
        self.t = 100.0
        self.events: list[dict[str, Any]] = []

    def at(self, dt: float) -> "Stream":
        self.t += dt
        return self

    def ev(self, kind: str, src: str = "h0", **fields: Any) -> dict[str, Any]:
        e = {"kind": kind, "mono": self.t, "ts": self.t, "node": src, "_src": src, "pid": fields.pop("pid", 1)}
        e.update(fields)
        self.events.append(e)
        self.t += 0.001
        return e

    def steps(self, first: int, last: int, gen: int, ws: int = 2, ranks: tuple[int, ...] = (0, 1),
              dt: float = 0.1, commit: bool = True, pids: dict[int, int] | None = None) -> "Stream":
        for s in range(first, last + 1):
            for r in ranks:
                self.ev("step.done", src=f"h{r}", step=s, gen=gen, world_size=ws, rank=r,
                        pid=(pids or {}).get(r, 10 + r + 100 * gen))
            if commit:
                self.ev("ckpt.committed", step=s + 1, gen=gen)
            self.at(dt)
        return self

    def gen(self, gen: int, ws: int = 2, nodes: tuple[str, ...] = ("h0", "h1")) -> "Stream":
        self.ev("gen.formed", gen=gen, world_size=ws, nodes=list(nodes))
        for i, n in enumerate(nodes):
            self.ev("rdzv.joined", src=n, gen=gen, world_size=ws, ranks=[i])
        return self


def sigkill_run(hash_: str = "abc") -> Stream:
    """Two ranks, rank 1 killed after step 15, restored at 16, finished at 39."""
    s = Stream()
    s.ev("chaos.run.start", src="chaos")
    s.gen(1)
    s.steps(0, 15, gen=1)
    s.ev("fault.fired", src="chaos", id="kill-w1", action="kill_worker", at=s.t, host="h1")
    s.at(0.05)
    s.ev("worker.exit", src="h1", rank=1, exitcode=-9, signal=9)
    s.at(0.2)
    s.gen(2)
    s.ev("restore.done", src="h0", rank=0, step=16, origin="local", verified=True)
    s.ev("restore.done", src="h1", rank=1, step=16, origin="local", verified=True)
    s.at(0.1)
    s.steps(16, 39, gen=2)
    for r in (0, 1):
        s.ev("train.done", src=f"h{r}", rank=r, step=40, state_hash=hash_, loss=0.5)
    for h in ("h0", "h1"):
        s.ev("agent.exit", src=h, code=0, reason="succeeded")
    return s
