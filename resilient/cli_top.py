"""``resilient top --rdzv-endpoint HOST:PORT[,...] --rdzv-id JOB``: a live terminal view of a running job.

Every ``--interval`` seconds (default 1) it reads the job from etcd and redraws one screen: the current
generation (world size, node count, age, process-group store), the committed step, the restart count,
one row per member node (group rank, ranks, lease left, last reported step, the step rate between
reports, how old the report is, agent address), nodes waiting to join, the last generation change
(``gen/<g-1>`` against ``gen/<g>``: world size, nodes lost and joined, the restart it was charged as) and
the newest fault record (``fault/<g>/<node>``) with how long the next generation took to form.

The snapshot of the job comes from ``resilient.cli_status.read_status`` plus ``read_history`` here;
``render`` turns it into text. The redraw is plain ANSI (cursor home, clear to end of line), no curses;
on a terminal the view uses the alternate screen and is cut to its size. ``--once`` prints one frame
without escapes and exits (for scripts and tests), ``--json`` with it prints the snapshot as JSON.

Exit status: 0 after ``--once``, ``-n`` frames or Ctrl-C; 2 for bad options, or when etcd cannot be
reached at start (or, with ``--once``, while reading). A live view keeps redrawing through etcd outages
and shows the error on top until etcd answers again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TextIO

from resilient import env
from resilient.cli_status import (
    add_job_etcd_args,
    ago,
    closed_text,
    etcd_settings,
    fmt,
    missing_job_hint,
    read_status,
)
from resilient.config import EtcdSettings
from resilient.errors import EtcdError, ResilientError
from resilient.etcd.api import Get, KVStore
from resilient.keys import JobKeys
from resilient.rendezvous.budget import BudgetRecord
from resilient.rendezvous.model import Assignment

EXIT_OK = 0
EXIT_USAGE = 2

# ANSI: alternate screen on/off, cursor hide/show, cursor home, clear to end of line / of screen
_ALT_ON, _ALT_OFF = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
_HOME, _EOL, _EOS = "\x1b[H", "\x1b[K", "\x1b[J"


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _fault_record(keys: JobKeys, key: str, raw: bytes) -> dict[str, Any] | None:
    """``fault/<g>/<node>`` as a dict (generation, node, what, detail, by, t); None for another key."""
    rest = key[len(keys.fault_prefix):]
    gen_part, _, node = rest.partition("/")
    if not gen_part.isdigit() or not node:
        return None
    value = _json(raw)
    d = value if isinstance(value, dict) else {"what": str(value)}
    return {
        "generation": int(gen_part),
        "node": node,
        "what": d.get("what"),
        "detail": d.get("detail") or {},
        "by": d.get("by"),
        "t": d.get("t"),
    }


def _assignment(kvs: list) -> Assignment | None:
    if not kvs:
        return None
    try:
        return Assignment.from_json(kvs[0].value)
    except ResilientError:
        return None


def read_history(kv: KVStore, job: str, generation: int) -> dict[str, Any]:
    """The last generation change and the newest fault of ``job`` (``generation`` is the current one).

    ``change``: generation g-1 -> g, when g formed, world sizes, nodes lost and joined, the faults
    published for g-1 and the reason the restart budget was charged with (None before generation 2).
    ``fault``: the newest fault record, with ``next_formed_at``, when the generation after it formed
    (None while that generation has not formed). ``ending``: faults already published for the current
    generation (it is being replaced). Fault records are kept for the whole job (one per failing node
    and generation), so they are read with one prefix read.
    """
    keys = JobKeys(job)
    ops = [Get(keys.fault_prefix, prefix=True), Get(keys.restarts)]
    if generation:
        ops.append(Get(keys.gen(generation)))
    if generation > 1:
        ops.append(Get(keys.gen(generation - 1)))
    r = kv.txn([], ops)
    faults_kv, restarts = r.responses[0], r.responses[1]
    current = _assignment(r.responses[2]) if generation else None
    previous = _assignment(r.responses[3]) if generation > 1 else None
    faults = [f for f in (_fault_record(keys, i.key, i.value) for i in faults_kv) if f is not None]
    faults.sort(key=lambda f: (f["generation"], f["t"] if isinstance(f["t"], (int, float)) else 0.0))
    try:
        budget = BudgetRecord.from_json(restarts[0].value) if restarts else BudgetRecord()
    except ResilientError:
        budget = BudgetRecord()
    charged = {c.generation: c.reason for c in budget.charges}

    change = None
    if current is not None and previous is not None:
        before, after = set(previous.node_ids), set(current.node_ids)
        change = {
            "from": previous.generation,
            "to": current.generation,
            "formed_at": current.created_at,
            "world_size_before": previous.world_size,
            "world_size_after": current.world_size,
            "lost": sorted(before - after),
            "joined": sorted(after - before),
            "faults": [f for f in faults if f["generation"] == previous.generation],
            "charged": charged.get(previous.generation),
        }
    last = faults[-1] if faults else None
    if last is not None:
        last = dict(last)
        nxt = last["generation"] + 1
        if current is not None and nxt == current.generation:
            last["next_formed_at"] = current.created_at
        elif nxt < generation:
            got = kv.get(keys.gen(nxt))
            later = _assignment([got]) if got is not None else None
            last["next_formed_at"] = later.created_at if later is not None else None
        else:
            last["next_formed_at"] = None
    return {
        "change": change,
        "fault": last,
        "ending": [f for f in faults if generation and f["generation"] == generation],
        "faults_total": len(faults),
    }


def gather(kv: KVStore, job: str, now: float | None = None) -> dict[str, Any]:
    """Everything one frame shows: ``read_status`` plus ``history`` (see ``read_history``)."""
    now = time.time() if now is None else now
    snap = read_status(kv, job, now)
    snap["history"] = read_history(kv, job, snap["generation"])
    snap["read_at"] = now
    return snap


@dataclass
class Rates:
    """Steps per second of each node, from consecutive progress reports (``progress/<node>`` holds the
    step and the reporting node's wall time). A node keeps its last rate until its next report; a step
    that goes backwards (the job rolled back to a committed step) starts over."""

    last: dict[str, tuple[float, float]] = field(default_factory=dict)  # node -> (step, report time)
    rate: dict[str, float] = field(default_factory=dict)

    def update(self, rows: Sequence[dict[str, Any]], now: float) -> dict[str, float]:
        for row in rows:
            node, step, age = row["node"], row.get("step"), row.get("progress_age_s")
            if not isinstance(step, (int, float)) or not isinstance(age, (int, float)):
                continue
            t = round(now - age, 3)
            prev = self.last.get(node)
            if prev is not None and step < prev[0]:
                self.rate.pop(node, None)
            elif prev is not None and t > prev[1] and step > prev[0]:
                self.rate[node] = (step - prev[0]) / (t - prev[1])
            if prev is None or t > prev[1] or step < prev[0]:
                self.last[node] = (float(step), t)
        return dict(self.rate)


def _age_s(age: Any) -> str:
    return "-" if not isinstance(age, (int, float)) else f"{age:.1f}s"


def _ranks(ranks: Sequence[int] | None) -> str:
    if not ranks:
        return "-"
    if list(ranks) == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
    return ",".join(str(r) for r in ranks)


def _fault_text(f: dict[str, Any]) -> str:
    detail = f.get("detail") or {}
    parts = [f"{f.get('what') or 'fault'} on {f['node']}"]
    if isinstance(detail, dict) and detail:
        parts.append("(" + " ".join(f"{k}={v}" for k, v in detail.items()) + ")")
    if f.get("by") and f.get("by") != f["node"]:
        parts.append(f"reported by {f['by']}")
    return " ".join(parts)


def _history_lines(h: dict[str, Any], now: float) -> list[str]:
    lines = []
    for f in h.get("ending") or []:
        lines.append(f"RECOVERING   generation {f['generation']} ends: {_fault_text(f)}, {ago(f.get('t'), now)}")
    c = h.get("change")
    if c is not None:
        text = (
            f"last change  gen {c['from']} -> {c['to']}, {ago(c['formed_at'], now)}: world size "
            f"{c['world_size_before']} -> {c['world_size_after']}; lost {', '.join(c['lost']) or '-'}; "
            f"joined {', '.join(c['joined']) or '-'}"
        )
        if c["faults"]:
            text += "; faults: " + "; ".join(_fault_text(f) for f in c["faults"])
        elif c["charged"]:
            text += f"; restart charged: {c['charged']}"
        lines.append(text)
    f = h.get("fault")
    if f is not None:
        text = f"last fault   gen {f['generation']}, {ago(f.get('t'), now)}: {_fault_text(f)}"
        nxt, t = f.get("next_formed_at"), f.get("t")
        if isinstance(nxt, (int, float)) and isinstance(t, (int, float)):
            text += f"; generation {f['generation'] + 1} formed {max(0.0, nxt - t):.2f}s later"
        elif nxt is None:
            text += "; the next generation has not formed yet"
        lines.append(text)
    else:
        lines.append("last fault   none recorded")
    return lines


def render(
    snap: dict[str, Any],
    now: float,
    rates: dict[str, float] | None = None,
    *,
    width: int | None = None,
    height: int | None = None,
    interval: float | None = None,
    error: str | None = None,
) -> str:
    """One frame as text. ``width``/``height`` cut lines and node rows to fit a terminal (None: no cut)."""
    rates = rates or {}
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    title = f"resilient top - job {snap['job']} - {clock}"
    if interval is not None:
        title += f" (every {interval:g}s, Ctrl-C quits)"
    lines = [title]
    if error:
        lines.append(f"ETCD ERROR   {error} (showing the last frame read; retrying)")
    if snap.get("closed") is not None:
        lines.append(f"CLOSED       {closed_text(snap['closed'], now)}")
    members, others = snap["members"], snap["other_nodes"]
    if not snap["generation"]:
        missing = missing_job_hint(snap)
        lines.append("generation   none has formed yet" + (f": {missing}" if missing else ""))
    else:
        lines.append(
            f"generation   {snap['generation']}   world size {snap['world_size']}   nodes {len(members)}   "
            f"formed {ago(snap['formed_at'], now)}   store {fmt(snap['master'])}"
        )
    committed = snap["committed"]
    if isinstance(committed, dict):
        when = ago(committed.get("committed_at"), now)
        ctext = f"{committed.get('step')} (gen {committed.get('generation')}, {when})"
    else:
        ctext = fmt(committed)
    lines.append(f"committed    step {ctext}   restarts {snap['restarts']}   closer {fmt(snap['closer'])}")
    lines += _history_lines(snap.get("history") or {}, now)
    lines.append("")
    header = (f"  {'node':<20} {'grp':>3} {'ranks':<9} {'alive':<5} {'lease':>6} {'step':>8} {'step/s':>7} "
              f"{'reported':>9}  addr")
    rows = []
    for row in members + others:
        rate = rates.get(row["node"])
        rows.append(
            f"  {row['node']:<20} {fmt(row.get('group_rank')):>3} {_ranks(row.get('ranks')):<9} "
            f"{'yes' if row['alive'] else 'NO':<5} {fmt(row.get('lease_left_s'), 's'):>6} "
            f"{fmt(row.get('step')):>8} {('-' if rate is None else f'{rate:.2f}'):>7} "
            f"{_age_s(row.get('progress_age_s')):>9}  {fmt(row.get('addr'))}"
        )
    tail = [f"waiting to join: {', '.join(snap['waiting'])}"] if snap["waiting"] else []
    if rows:
        lines.append(header)
        if height is not None:
            room = max(1, height - len(lines) - len(tail) - 1)
            if len(rows) > room:
                hidden = len(rows) - (room - 1)
                rows = rows[: room - 1] + [f"  ... {hidden} more nodes (resilient status lists them all)"]
        lines += rows
    lines += tail
    if width is not None:
        lines = [line[:width] for line in lines]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resilient top",
        description="A live view of a running job from etcd: members, generation, progress, commits, last recovery.",
    )
    add_job_etcd_args(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between frames. Default 1.")
    p.add_argument("--once", action="store_true", help="print one frame without terminal escapes and exit")
    p.add_argument("-n", "--iterations", type=int, default=0, help="stop after N frames (0: until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="with --once: print the frame's data as one JSON object")
    return p


def _settings(args: argparse.Namespace) -> EtcdSettings:
    return etcd_settings(args, request_deadline=max(2 * args.interval, 2.0))


def run_live(
    read: Callable[[float], dict[str, Any]],
    out: TextIO,
    *,
    interval: float,
    iterations: int = 0,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Redraw a frame every ``interval`` seconds until ``iterations`` frames (0: until Ctrl-C).

    On a terminal: alternate screen, cursor home and clear-to-end-of-line per frame, cut to the terminal
    size. Elsewhere (a pipe, a file): frames are printed one after another, separated by a blank line.
    An etcd error keeps the last frame on screen with the error above it."""
    tty = out.isatty()
    rates = Rates()
    last: dict[str, Any] | None = None
    frames = 0
    if tty:
        out.write(_ALT_ON)
    try:
        while True:
            now = clock()
            error = None
            try:
                last = read(now)
            except EtcdError as exc:
                error = str(exc).splitlines()[0]
            if last is not None:
                size = shutil.get_terminal_size() if tty else None
                text = render(last, now, rates.update(last["members"] + last["other_nodes"], now) if error is None
                              else rates.rate, width=size.columns if size else None,
                              height=size.lines if size else None, interval=interval, error=error)
            else:
                text = f"resilient top: waiting for etcd: {error}"
            if tty:
                out.write(_HOME + text.replace("\n", _EOL + "\n") + _EOL + _EOS)
            else:
                out.write(("\n" if frames else "") + text + "\n")
            out.flush()
            frames += 1
            if iterations and frames >= iterations:
                return EXIT_OK
            sleep(max(0.0, interval - (clock() - now)))
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if tty:
            out.write(_ALT_OFF)
            out.flush()


def top_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.rdzv_endpoint:
        parser.error(f"--rdzv-endpoint is required (or set {env.ETCD_ENDPOINTS})")
    if args.interval <= 0 or args.connect_timeout <= 0 or args.iterations < 0:
        parser.error("--interval and --connect-timeout must be > 0 and --iterations >= 0")
    if args.json and not args.once:
        parser.error("--json prints one snapshot: use it with --once")
    if args.etcd_user and not env.get(env.ETCD_PASSWORD):
        parser.error(f"--etcd-user needs the password in ${env.ETCD_PASSWORD}")
    from resilient.etcd.client import EtcdKV

    try:
        kv = EtcdKV.connect(_settings(args))
    except EtcdError as exc:
        print(f"resilient top: cannot reach etcd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ResilientError as exc:
        print(f"resilient top: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with kv:
        if args.once:
            now = time.time()
            try:
                snap = gather(kv, args.rdzv_id, now)
            except EtcdError as exc:
                print(f"resilient top: cannot read job {args.rdzv_id!r} from etcd: {exc}", file=sys.stderr)
                return EXIT_USAGE
            print(json.dumps(snap) if args.json else render(snap, now))
            return EXIT_OK
        # SIGTERM quits like Ctrl-C, so the terminal leaves the alternate screen either way
        swap = threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        if swap:
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return run_live(lambda now: gather(kv, args.rdzv_id, now), sys.stdout, interval=args.interval,
                            iterations=args.iterations)
        finally:
            if swap:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(top_main())
