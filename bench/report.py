#!/usr/bin/env python3
"""The benchmark report: docs/benchmarks.md and docs/benchmarks.svg.

Plain Python 3, no packages. Three subcommands, used by bench/run.sh:

  report.py machine [--config F] [--work DIR] [--nats BIN --nats-config F]
      prints this machine (CPUs, CPU model, memory, kernel, OS, rustc,
      node, nats-server, the git commit, the date) as one JSON object,
      with the configs the run uses (the nats token left out)
  report.py record --scenario S --server wsgate|node|nats --cert ecdsa|rsa
                   --exit RC --server-command C --bench-command C
                   --stdout FILE [--samples FILE] [--work DIR] [--root DIR]
      prints one results line: the run's metadata and the last JSON line
      of `wsgate bench` (its stdout), with the server's and the load
      generator's RSS and CPU sampled once a second (--samples lines:
      `epoch server_rss_kib server_cpu_ticks client_cpu_ticks`)
  report.py render --results results.jsonl --machine machine.json
                   --md docs/benchmarks.md --svg docs/benchmarks.svg [--quick 0|1]
                   [--notes bench/notes.md]
      writes the report: issue 16's round-2 goals (RSS per idle subscribed
      connection; fan-out CPU per delivery and p99 against the rustls
      floor), the machine, the commands, the three servers' figures (idle
      RSS with and without a subscription, fan-out rate, latency, server
      CPU per delivery and both processes' CPU share, connects), the
      ratios wsgate/peer for each peer, the targets of the performance
      issue (against the Node peer), the kernel floor, and a bar chart of
      the ratios; the notes file, when it exists, is
      included verbatim (what does not hold, by how much, what the profile
      shows, what was tried).
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys

SERVERS = ("wsgate", "node", "nats")
# The performance issue's targets are against the Node peer; nats-server is
# shown beside it, with its own ratios and no targets.
PEER = "node"
NATS = "nats"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# Soak: growth of the RSS while idle connections are held counts as noise
# up to this share of the RSS (or this many KiB, whichever is larger).
NOISE_SHARE = 0.01
NOISE_KIB = 1024
SOAK_TARGET_S = 600
# "Several thousand" connects per second with the ECDSA P-256 certificate.
ECDSA_CONNECTS_TARGET = 3000
# Round 2 (issue 16): RSS per idle connection holding one subscription
# (KiB), and wsgate's fan-out at window 1 against the kernel floor with
# rustls records (`floor-tls`): server CPU per delivery ÷ the floor's CPU
# per write, delivery p99 ÷ the floor's round p99.
IDLE_GOAL_KIB = 8.0
CPU_GOAL = 1.4
LATENCY_GOAL = 1.5


# ---------------------------------------------------------------- machine


def _run(*cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def machine():
    cpu_model = None
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith("model name") and ":" in line:
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kib = None
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    os_name = None
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            os_name = line.split("=", 1)[1].strip().strip('"')
    commit = _run("git", "rev-parse", "--short", "HEAD")
    if commit and _run("git", "status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    nofile = None
    try:
        import resource

        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        pass
    return {
        "nproc": int(_run("nproc") or os.cpu_count() or 0),
        "cpu_model": cpu_model or platform.processor() or "unknown",
        "mem_total_kib": mem_kib,
        "kernel": " ".join(filter(None, [platform.system(), platform.release()])),
        "os": os_name,
        "rustc": _run("rustc", "--version"),
        "node": _run("node", "--version"),
        "nats": None,
        "commit": commit,
        "open_files": nofile,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---------------------------------------------------------------- record


def last_json_line(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def read_samples(path):
    """[(epoch, server_rss_kib, server_ticks, client_ticks|None)]"""
    samples = []
    for line in _read(path).splitlines():
        parts = line.split()
        try:
            t, rss, sticks = float(parts[0]), int(parts[1]), int(parts[2])
            cticks = int(parts[3]) if len(parts) > 3 and parts[3] != "-" else None
        except (ValueError, IndexError):
            continue
        samples.append((t, rss, sticks, cticks))
    return samples


def cpu_percent(samples, index):
    """Per-interval CPU use (%) from cumulative tick counts."""
    out = []
    for a, b in zip(samples, samples[1:]):
        if a[index] is None or b[index] is None or b[0] <= a[0]:
            continue
        out.append(100.0 * (b[index] - a[index]) / CLK_TCK / (b[0] - a[0]))
    return out


def p90(values):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]


def shorten(cmd, work, root):
    cmd = re.sub(r"--server-pid \d+", "--server-pid $SERVER_PID", cmd)
    if work:
        cmd = cmd.replace(work, "$WORK")
    if root:
        cmd = cmd.replace(root + "/", "")
    return cmd


def record(a):
    text = _read(a.stdout)
    result = last_json_line(text)
    samples = read_samples(a.samples) if a.samples else []
    entry = {
        "scenario": a.scenario,
        "server": a.server,
        "cert": a.cert,
        "exit": a.exit,
        "server_command": shorten(a.server_command, a.work, a.root),
        "bench_command": shorten(a.bench_command, a.work, a.root),
        "result": result,
        "samples": [[round(t - samples[0][0], 2), rss] for t, rss, _, _ in samples] if samples else [],
        "server_cpu_p90": _round(p90(cpu_percent(samples, 2))),
        "client_cpu_p90": _round(p90(cpu_percent(samples, 3))),
        "server_rss_max_kib": max((s[1] for s in samples), default=None),
    }
    if result is None:
        entry["error"] = "no JSON line on stdout" + (f" (exit {a.exit})" if a.exit else "")
    print(json.dumps(entry, separators=(",", ":")))


def _round(x, nd=1):
    return None if x is None else round(x, nd)


# ---------------------------------------------------------------- render


def load_results(path):
    runs = []
    for n, line in enumerate(_read(path).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            runs.append(json.loads(line))
        except ValueError:
            print(f"report.py: {path}:{n}: not JSON, skipped", file=sys.stderr)
    return runs


def get(runs, scenario, server):
    """The last run of `scenario` on `server` (or None). The floor runs at
    the start and at the end of a run: it is the machine's limit, so its
    best (least CPU per write) stands, a slow moment of the machine being
    noise rather than its limit."""
    found = None
    for r in runs:
        if r.get("scenario") == scenario and r.get("server") == server:
            if server == "kernel" and found is not None:
                ours, best = res(r, "cpu_us_per_write"), res(found, "cpu_us_per_write")
                if ours is None or (best is not None and best <= ours):
                    continue
            found = r
    return found


def res(run, *path):
    """A number inside the run's result, or None."""
    if not run or not isinstance(run.get("result"), dict):
        return None
    x = run["result"]
    for p in path:
        if not isinstance(x, dict) or x.get(p) is None:
            return None
        x = x[p]
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def hold_growth(run):
    """(growth KiB, RSS at the start of the hold KiB, hold seconds) of an idle run."""
    r = run.get("result") if run else None
    if not isinstance(r, dict):
        return None
    start = r.get("rss_after_kib")
    samples = r.get("rss_samples_kib") or []
    hold = _hold_of(run)
    if start is not None and samples:
        return samples[-1] - start, start, hold
    # Without the load generator's own samples: run.sh's one-second samples
    # in the last `hold` seconds before the run ended (2 s margins).
    mine = run.get("samples") or []
    if hold and mine:
        end = mine[-1][0]
        window = [rss for t, rss in mine if end - hold + 2 <= t <= end - 2]
        if len(window) >= 2:
            return window[-1] - window[0], window[0], hold
    return None


def _hold_of(run):
    parts = (run or {}).get("bench_command", "").split()
    if "--hold" in parts:
        try:
            return float(parts[parts.index("--hold") + 1])
        except (ValueError, IndexError):
            pass
    return None


def fmt(x, unit="", nd=None):
    if x is None:
        return "n/a"
    if nd is None:
        nd = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    s = f"{x:,.{nd}f}"
    return s + unit


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _shares(client, server):
    """The load generator's CPU share (the server's), as percent of a core."""
    if client is None and server is None:
        return "n/a"
    return fmt(None if client is None else 100 * client, " %", 0) + (
        f" ({fmt(100 * server, ' %', 0)})" if server is not None else "")


class Row:
    """One figure: the three servers' values, the ratios wsgate/peer, the
    target (against the Node peer)."""

    def __init__(self, figure, w, p, unit, nd=None, target=None, goal=None, check=None, better="higher", chart=None,
                 n=None, compare=True, cells=None, optional=False):
        self.figure, self.w, self.p, self.n, self.unit, self.nd = figure, w, p, n, unit, nd
        # compare=False: a figure that describes the run (the load
        # generator's CPU share), with no ratio wsgate/peer.
        self.compare = compare
        self.ratio = ratio(w, p) if compare else None
        self.ratio_n = ratio(w, n) if compare else None
        self.cells = cells  # the three servers' cells as text, instead of fmt(value)
        # optional: a figure older records do not have; left out when no
        # server has it.
        self.optional = optional
        self.target = target  # text
        self.goal = goal  # (what, op, bound): what "ratio" or "wsgate", op "<=" or ">="
        self.check = check  # callable(row) -> True/False/None, when there is no goal
        self.better = better
        self.chart = chart  # (label, target advantage or None)

    def _measured(self):
        return self.ratio if self.goal[0] == "ratio" else self.w

    def holds(self):
        if self.goal:
            x = self._measured()
            if x is None:
                return None
            return x <= self.goal[2] if self.goal[1] == "<=" else x >= self.goal[2]
        if self.check is None:
            return None
        return self.check(self)

    def shortfall(self):
        """How many times better wsgate must get to meet the goal (> 1), or None."""
        if not self.goal or self.holds() is not False:
            return None
        x, bound = self._measured(), self.goal[2]
        if x == 0:
            return None
        return x / bound if self.goal[1] == "<=" else bound / x

    def advantage(self, r=None):
        """How many times better wsgate is than the Node peer (or, given
        `r`, that ratio), higher is better, for the chart."""
        r = self.ratio if r is None else r
        if r is None or r == 0:
            return None
        return r if self.better == "higher" else 1 / r

    def advantage_n(self):
        """How many times better wsgate is than nats-server."""
        return self.advantage(self.ratio_n) if self.ratio_n is not None else None


def verdict(v):
    return {True: "**yes**", False: "**no**", None: "—"}[v]


def build_rows(runs):
    W, P, N = "wsgate", PEER, NATS
    rows = []

    def trio(scenario, *path):
        return tuple(res(get(runs, scenario, srv), *path) for srv in (W, P, N))

    def any_of(scenario, *path):
        for srv in (W, P, N):
            x = res(get(runs, scenario, srv), *path)
            if x is not None:
                return x
        return None

    def ms(values):
        return tuple(None if v is None else v / 1000 for v in values)

    # idle memory
    for scen, n_label in (("idle", "10,000"), ("idle-big", "18,000")):
        w, p, n = trio(scen, "rss_per_conn_kib")
        count = any_of(scen, "connections")
        label = f"RSS per idle wss connection at {fmt(count, nd=0) if count else n_label} connections, no subscription"
        rows.append(
            Row(
                label,
                w,
                p,
                " KiB",
                1,
                target="≤ 1/5 of the peer's (ratio ≤ 0.20)",
                goal=("ratio", "<=", 0.2),
                better="lower",
                chart=(f"idle RSS/conn, {fmt(count, nd=0) if count else n_label}", 5.0),
                n=n,
            )
        )
    # idle memory, each connection subscribed to one channel (the Node
    # peer's are by nature: it broadcasts to every client)
    for scen, n_label in (("idle-sub", "10,000"), ("idle-big-sub", "18,000")):
        w, p, n = trio(scen, "rss_per_conn_kib")
        count = any_of(scen, "connections")
        rows.append(
            Row(
                f"RSS per idle wss connection at {fmt(count, nd=0) if count else n_label} connections, "
                "each subscribed to one channel",
                w,
                p,
                " KiB",
                1,
                target=f"wsgate ≤ {IDLE_GOAL_KIB:g} KiB (round 2)",
                goal=("wsgate", "<=", IDLE_GOAL_KIB),
                better="lower",
                n=n,
                optional=True,
            )
        )
    tls_floor_cpu = res(get(runs, "floor-tls", "kernel"), "cpu_us_per_write")
    # fan-out
    for scen, win in (("fanout-w100", "100"), ("fanout-w1", "1")):
        w, p, n = trio(scen, "deliveries_per_s")
        subs = any_of(scen, "subscribers")
        size = any_of(scen, "size")
        rows.append(
            Row(
                f"fan-out 1 → {fmt(subs, nd=0)} subscribers, {fmt(size, nd=0)} B, window {win}: deliveries/s",
                w,
                p,
                "",
                0,
                target="≥ 2.5× the peer",
                goal=("ratio", ">=", 2.5),
                chart=(f"fan-out w{win}, deliveries/s", 2.5),
                n=n,
            )
        )
        for q in ("p50", "p99"):
            w, p, n = ms(trio(scen, "latency_us", q))
            is_target = win == "1" and q == "p99"
            rows.append(
                Row(
                    f"fan-out window {win}: {q} latency",
                    w,
                    p,
                    " ms",
                    2,
                    target="wsgate ≤ 5 ms" if is_target else None,
                    goal=("wsgate", "<=", 5.0) if is_target else None,
                    better="lower",
                    n=n,
                )
            )
        w, p, n = trio(scen, "server_cpu_us_per_delivery")
        is_target = win == "1" and tls_floor_cpu is not None
        rows.append(
            Row(
                f"fan-out window {win}: server CPU per delivery",
                w,
                p,
                " µs",
                2,
                target=(f"wsgate ≤ {CPU_GOAL:g}× the rustls floor's {fmt(tls_floor_cpu, ' µs', 2)} per write "
                        "(round 2)") if is_target else None,
                goal=("wsgate", "<=", CPU_GOAL * tls_floor_cpu) if is_target else None,
                better="lower",
                n=n,
                optional=True,
            )
        )
        shares = [(res(get(runs, scen, srv), "client_cpu_share"), res(get(runs, scen, srv), "server_cpu_share"))
                  for srv in (W, P, N)]
        rows.append(
            Row(
                f"fan-out window {win}: the load generator's CPU (the server's), share of one core",
                shares[0][0],
                shares[1][0],
                " %",
                compare=False,
                cells=[_shares(c, sv) for c, sv in shares],
                n=shares[2][0],
                optional=not any(c is not None or sv is not None for c, sv in shares),
            )
        )
    # connects
    w, p, n = trio("connect-rsa", "connects_per_s")
    rows.append(
        Row(
            "authenticated connects/s, RSA-2048 certificate (every server)",
            w,
            p,
            "/s",
            0,
            target="≥ 2× the peer",
            goal=("ratio", ">=", 2.0),
            chart=("connects/s, RSA-2048", 2.0),
            n=n,
        )
    )
    w, p, n = trio("connect-ecdsa", "connects_per_s")
    rows.append(
        Row(
            "authenticated connects/s, ECDSA P-256 certificate",
            w,
            p,
            "/s",
            0,
            target=f"wsgate: several thousand (read as ≥ {ECDSA_CONNECTS_TARGET:,}/s)",
            goal=("wsgate", ">=", ECDSA_CONNECTS_TARGET),
            chart=("connects/s, ECDSA P-256", None),
            n=n,
        )
    )
    for scen, label in (("connect-rsa", "RSA-2048"), ("connect-ecdsa", "ECDSA P-256")):
        w, p, n = trio(scen, "latency_ms", "p99")
        rows.append(Row(f"connect p99 latency, {label}", w, p, " ms", 1, better="lower", n=n))
    # memory over the hold
    gw, gp, gn = (hold_growth(get(runs, "idle", srv)) for srv in (W, P, N))
    # BENCH_SOAK holds wsgate's idle connections longer than the peers'.
    holds_s = [g[2] for g in (gw, gp, gn) if g and g[2]]
    hold_w = gw[2] if gw else None
    hold_peers = sorted({h for g, h in ((gp, gp and gp[2]), (gn, gn and gn[2])) if g and h})
    if hold_w and hold_peers and hold_peers != [hold_w]:
        held = (f"wsgate held {fmt(hold_w, ' s', 0)}, the peers "
                + " and ".join(fmt(h, " s", 0) for h in hold_peers))
    elif holds_s:
        held = f"held {fmt(holds_s[0], ' s', 0)}"
    else:
        held = ""

    def soak_check(r):
        if gw is None:
            return None
        growth, start, h = gw
        if h is None or h < SOAK_TARGET_S:
            return None
        return growth <= max(NOISE_KIB, NOISE_SHARE * start)

    rows.append(
        Row(
            "RSS growth while holding the idle connections (heartbeats)" + (f": {held}" if held else ""),
            None if gw is None else gw[0],
            None if gp is None else gp[0],
            " KiB",
            0,
            target=f"no growth beyond noise (≤ {NOISE_SHARE:.0%} of RSS or {NOISE_KIB} KiB) over {SOAK_TARGET_S // 60} min",
            check=soak_check,
            better="lower",
            n=None if gn is None else gn[0],
        )
    )
    return [r for r in rows if not (r.optional and r.w is None and r.p is None and r.n is None)]


def build_goals(runs):
    """Issue 16's round-2 goals from this run's records, one dict each:
    id, figure, scenario, wsgate (text), floor (text), measured (number),
    measured_text, goal_text, bound, informational, holds (True, False or
    None when not measured), missing (what the run lacks)."""
    W = "wsgate"
    floor = get(runs, "floor-tls", "kernel")
    floor_cpu = res(floor, "cpu_us_per_write")
    floor_p99 = res(floor, "round_ms_p99")
    goals = []

    def idle_goal(gid, scen, n_label, informational):
        run = get(runs, scen, W)
        x = res(run, "rss_per_conn_kib")
        count = res(run, "connections")
        opened = res(run, "opened")
        what = "holding one subscription" if scen.endswith("-sub") else "with no subscription"
        figure = f"RSS per idle connection {what}, {fmt(count, nd=0) if count else n_label} connections"
        short = "" if opened is None or count is None or opened >= count else \
            f" ({fmt(opened, nd=0)} of {fmt(count, nd=0)} opened)"
        goals.append({
            "id": gid, "figure": figure, "scenario": scen,
            "wsgate": fmt(x, " KiB", 1) + short if x is not None else "not measured",
            "floor": "—", "measured": x, "measured_text": fmt(x, " KiB", 1) if x is not None else "not measured",
            "goal_text": f"≤ {IDLE_GOAL_KIB:g} KiB", "bound": IDLE_GOAL_KIB, "unit": " KiB",
            "informational": informational,
            "missing": None if x is not None else f"no `{scen}` record of wsgate",
        })

    def floor_goal(gid, figure, scen, w_value, w_text, floor_value, floor_text, bound, informational, needs):
        r = ratio(w_value, floor_value)
        missing = []
        if w_value is None:
            missing.append(needs)
        if floor_value is None:
            missing.append("no `floor-tls` record")
        goals.append({
            "id": gid, "figure": figure, "scenario": scen,
            "wsgate": w_text if w_value is not None else "not measured",
            "floor": floor_text if floor_value is not None else "not measured",
            "measured": r, "measured_text": fmt(r, "×", 2) if r is not None else "not measured",
            "goal_text": f"≤ {bound:g}×", "bound": bound, "unit": "×",
            "informational": informational, "missing": "; ".join(missing) or None,
        })

    idle_goal("a", "idle-sub", "10,000", False)
    idle_goal("b", "idle-big-sub", "18,000", False)
    idle_goal("c1", "idle", "10,000", True)
    idle_goal("c2", "idle-big", "18,000", True)
    for gid, win, informational in (("d", 1, False), ("e", 100, True)):
        run = get(runs, f"fanout-w{win}", W)
        cpu = res(run, "server_cpu_us_per_delivery")
        floor_goal(gid, f"server CPU per delivery, window {win}, ÷ the floor's CPU per write",
                   f"fanout-w{win}", cpu, fmt(cpu, " µs", 2), floor_cpu, fmt(floor_cpu, " µs", 2),
                   CPU_GOAL, informational,
                   f"no `fanout-w{win}` record of wsgate" if not run else
                   f"wsgate's `fanout-w{win}` record has no server CPU: it ran without `--server-pid`")
    run = get(runs, "fanout-w1", W)
    p99 = res(run, "latency_us", "p99")
    p99 = None if p99 is None else p99 / 1000
    floor_goal("f", "delivery p99, window 1, ÷ the floor's round p99", "fanout-w1",
               p99, fmt(p99, " ms", 2), floor_p99, fmt(floor_p99, " ms", 2), LATENCY_GOAL, False,
               "no `fanout-w1` record of wsgate")
    for g in goals:
        x = g["measured"]
        g["holds"] = None if x is None else x <= g["bound"]
    return goals


def _margin(g):
    """How far the measured figure is from the goal's bound, in words."""
    x, bound = g["measured"], g["bound"]
    if x is None:
        return "—"
    times = f"{x / bound:.2f}× the goal"
    if g["unit"] == " KiB":
        diff = abs(x - bound)
        return f"{times}: {fmt(diff, ' KiB', 1)} {'over' if x > bound else 'to spare'}"
    return times


def render_goals(add, runs, goals, notes):
    W = "wsgate"
    floor = get(runs, "floor-tls", "kernel") or get(runs, "floor-tcp", "kernel")
    size, conns = res(floor, "size"), res(floor, "connections")
    each = (f"one {fmt(size, ' B', 0)} record to each of {fmt(conns, nd=0)} loopback connections"
            if size is not None and conns is not None else "one record to each loopback connection")
    add("## Round 2 goals (issue 16)")
    add("")
    add(
        "From this run's records. Memory: the server's RSS just after the ramp minus before it, per open "
        "connection (`idle-sub`, `idle-big-sub`: each connection subscribed to one channel; `idle`, "
        "`idle-big`: none). CPU and latency are against the kernel floor with rustls records "
        f"(`floor-tls`: one writer where the servers run, {each} in turn, no WebSocket, JSON or hub; "
        "see The kernel floor below) and come from wsgate's `fanout-w1` and `fanout-w100` with the "
        "same subscribers: the server's CPU (user + system) over the measured seconds per delivery, "
        "and the delivery p99. Informational rows are shown against the same line but are not "
        "goals of the issue."
    )
    add("")
    table = []
    for g in goals:
        holds = "not measured" if g["holds"] is None else verdict(g["holds"])
        table.append((
            g["id"],
            f"{g['figure']} (`{g['scenario']}`)",
            g["wsgate"],
            g["floor"],
            g["measured_text"] if g["unit"] == "×" else "—",
            g["goal_text"] + (" (informational)" if g["informational"] else ""),
            _margin(g),
            holds,
        ))
    add(md_table(("", "figure", "wsgate", "rustls floor", "wsgate ÷ floor", "goal", "margin", "holds"), table))
    add("")
    where = "bench/notes.md (the Notes below)" if notes and notes.strip() else "bench/notes.md"
    for g in goals:
        if g["holds"] is False:
            add(
                f"- **{g['id']} does not hold**{' (informational)' if g['informational'] else ''}: "
                f"{g['figure']} is {g['measured_text']}, {g['measured'] / g['bound']:.2f}× the goal "
                f"of {g['goal_text']}. "
                f"The profile that explains the rest is in {where}."
            )
    missing = [g for g in goals if g["holds"] is None]
    if missing:
        add(
            "- **Not measured in this run:** "
            + "; ".join(f"{g['id']} ({g['missing']})" for g in missing)
            + ". `BENCH_ONLY=\"floor idle idle-big idle-sub idle-big-sub fanout-w100 fanout-w1\" "
            "BENCH_SERVERS=wsgate bench/run.sh` measures all of them."
        )
    if any(g["holds"] is False or g["holds"] is None for g in goals):
        add("")
    paces = []
    for win in (1, 100):
        run = get(runs, f"fanout-w{win}", W)
        c, sv = res(run, "client_cpu_share"), res(run, "server_cpu_share")
        if c is None and sv is None:
            continue
        paces.append(
            f"at window {win} the server used {fmt(None if sv is None else 100 * sv, ' %', 0)} of its core "
            f"and the load generator {fmt(None if c is None else 100 * c, ' %', 0)} of its own"
            + (" (the load generator near its full core: it, not the server, may have set the pace)"
               if c is not None and c >= 0.9 else "")
        )
    if paces:
        add("Over the measured seconds of wsgate's fan-out, " + "; ".join(paces) + ".")
        add("")


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def details_table(runs):
    out = []
    for r in runs:
        x = r.get("result") if isinstance(r.get("result"), dict) else {}
        mode = x.get("mode", "")
        if mode == "idle":
            what = (
                (f"subscribed to `{x.get('channel')}`"
                 + (" with presence" if x.get("presence") else "") + "; " if x.get("channel") else "")
                + f"{x.get('opened')}/{x.get('connections')} open, {x.get('failed')} failed; "
                f"RSS {fmt(x.get('rss_before_kib'), nd=0)} → {fmt(x.get('rss_after_kib'), nd=0)} KiB; "
                f"held: {', '.join(str(s) for s in x.get('rss_samples_kib') or []) or '—'} KiB"
            )
        elif mode == "fanout":
            lat = x.get("latency_us") or {}
            what = (
                f"published {x.get('published')}, delivered {x.get('delivered')} in {fmt(x.get('duration_s'), ' s')}, "
                f"errors {x.get('errors')}; latency µs p50 {lat.get('p50')} p90 {lat.get('p90')} "
                f"p99 {lat.get('p99')} max {lat.get('max')}"
            )
            if x.get("server_cpu_us_per_delivery") is not None or x.get("client_cpu_share") is not None:
                share = (lambda v: fmt(None if v is None else 100 * v, " %", 0))
                what += (
                    f"; server CPU {fmt(x.get('server_cpu_us_per_delivery'), ' µs', 2)} per delivery; "
                    f"measured seconds' CPU: server {share(x.get('server_cpu_share'))}, "
                    f"load generator {share(x.get('client_cpu_share'))}"
                )
        elif mode == "resume":
            what = (
                f"{x.get('recovered')}/{x.get('connections')} recovered, {x.get('failed')} failed, "
                f"{x.get('missed_per_client')} replayed each; all live after {fmt(x.get('to_live_s'), ' s', 2)}; "
                f"server CPU {fmt(x.get('server_cpu_s'), ' s', 2)}; Redis commands {x.get('redis_commands')}"
            )
        elif mode == "api":
            req = x.get("request_us") or {}
            lat = x.get("latency_us") or {}
            what = (
                f"{x.get('connections')} connections: published {x.get('published')}, delivered "
                f"{x.get('delivered')} in {fmt(x.get('duration_s'), ' s')}, errors {x.get('errors')}; "
                f"request µs p50 {req.get('p50')} p99 {req.get('p99')}; delivery latency µs "
                f"p50 {lat.get('p50')} p99 {lat.get('p99')} max {lat.get('max')}"
            )
        elif mode == "floor":
            what = (
                f"{'rustls records' if x.get('tls') else 'plain TCP'}: {x.get('connections')} connections, "
                f"{x.get('size')} B, {x.get('writes')} writes in {fmt(x.get('duration_s'), ' s')} "
                f"({fmt(x.get('writes_per_s'), '/s', 0)}); CPU {fmt(x.get('cpu_us_per_write'), ' µs', 2)} per write; "
                f"round ms p50 {fmt(x.get('round_ms_p50'), nd=2)} p99 {fmt(x.get('round_ms_p99'), nd=2)}"
            )
        elif mode == "connect":
            lat = x.get("latency_ms") or {}
            what = (
                f"{x.get('ok')}/{x.get('connections')} ok, {x.get('failed')} failed in {fmt(x.get('elapsed_s'), ' s')}; "
                f"latency ms p50 {lat.get('p50')} p90 {lat.get('p90')} p99 {lat.get('p99')} max {lat.get('max')}"
            )
        else:
            what = "**failed**: " + str(r.get("error") or f"exit {r.get('exit')}")
        if r.get("exit") not in (0, None) and mode:
            what += f" (**exit {r.get('exit')}**)"
        out.append(
            (
                r.get("scenario"),
                r.get("server"),
                r.get("cert"),
                what,
                fmt(r.get("server_cpu_p90"), " %", 0),
                fmt(r.get("client_cpu_p90"), " %", 0),
            )
        )
    return md_table(("scenario", "server", "cert", "result", "server CPU p90", "bench CPU p90"), out)


def render_md(runs, mach, rows, quick, svg_name, notes=None, goals=None):
    W = "wsgate"
    lines = []
    add = lines.append
    has_nats = any(r.get("server") == NATS for r in runs)
    add("# Benchmarks: wsgate beside a hand-rolled Node `ws` server"
        + (" and nats-server" if has_nats else ""))
    add("")
    add(
        "Generated by `bench/run.sh` (with `bench/report.py`); do not edit by hand. "
        "Each server runs pinned to CPU 0 and the load generator, `wsgate bench`, to CPU 1, "
        "over loopback, one server at a time, wsgate and the peers in turn. "
        "The Node peer is `bench/peers/node-ws`: Node's `https` + `ws` + `jsonwebtoken`, "
        "checking an HS256 token at the upgrade and broadcasting every text message to every open client "
        "(no channels, policies or envelope, so it does less work per message than wsgate)."
    )
    add("")
    if has_nats:
        version = (mach.get("nats") or "nats-server (version not recorded)").replace("nats-server: ", "nats-server ")
        add(
            f"The second peer is {version} (Debian's package), its WebSocket listener with TLS "
            "(`bench/peers/nats`): the load generator speaks the NATS protocol over the same `wss://` "
            "connection (`wsgate bench --nats`: `CONNECT`, `SUB`, `PUB`, `MSG`, one subject for the channel). "
            "**It checks less than the others at connect:** nats-server has no HS256 JWT check, so every "
            "client sends one shared token (the run's HMAC secret as text) as `auth_token` in `CONNECT`, "
            "which the server compares in constant time after the upgrade; there is no JWT to parse, no "
            "signature, no expiry and no identity per client. Like the Node peer it has no policies or "
            "envelope; unlike it, it routes by subject and does not send a publisher its own messages. "
            "The targets below are against the Node peer, as the performance issue sets them; nats-server "
            "has its own columns and ratios, with no targets."
        )
        add("")
    if quick:
        add(
            "> **Smoke run (`BENCH_QUICK=1`)**: small numbers and short durations; "
            "these figures only show that the pipeline works, not how the servers compare."
        )
        add("")
    render_goals(add, runs, build_goals(runs) if goals is None else goals, notes)
    add("## Machine")
    add("")
    mem = mach.get("mem_total_kib")
    add(
        md_table(
            ("", ""),
            [
                ("date", mach.get("date", "n/a")),
                ("CPUs (`nproc`)", mach.get("nproc", "n/a")),
                ("CPU model", mach.get("cpu_model", "n/a")),
                ("memory", f"{mem / 1024 / 1024:.1f} GiB" if mem else "n/a"),
                ("kernel", mach.get("kernel", "n/a")),
                ("OS", mach.get("os") or "n/a"),
                ("rustc", mach.get("rustc") or "n/a"),
                ("node", mach.get("node") or "n/a"),
                ("nats-server", (mach.get("nats") or "n/a").replace("nats-server: ", "")),
                ("open files per process", mach.get("open_files") or "n/a"),
                ("wsgate commit", mach.get("commit") or "n/a"),
            ],
        )
    )
    add("")
    add("## Results against the targets")
    add("")
    add(
        "Ratios are wsgate ÷ peer. For memory, latency and CPU per delivery lower is better; "
        "for deliveries and connects higher is better. The targets are against the Node peer, "
        "except those marked wsgate and round 2. Idle memory is the server's RSS after the ramp "
        "minus before, per open connection: with no subscription (`idle`, `idle-big`), and with "
        "each connection subscribed to one channel (`idle-sub`, `idle-big-sub`; nats-server: one "
        "subject; the Node peer broadcasts to every client, so its connections are subscribed by "
        "nature and its two kinds of idle run are the same). The fan-out's CPU figures are taken "
        "over its measured seconds (after the warm-up): the server's CPU (user + system) per "
        "delivery, and each process's CPU as a share of one core; a load generator near 100 % "
        "set the pace, so the server's rate then says less than its capacity."
    )
    add("")
    table = []
    for r in rows:
        values = r.cells or [fmt(v, r.unit, r.nd) for v in (r.w, r.p, r.n)]
        cells = [r.figure, values[0], values[1]]
        if has_nats:
            cells.append(values[2])
        cells.append(fmt(r.ratio, "×", 2) if r.compare else "—")
        if has_nats:
            cells.append(fmt(r.ratio_n, "×", 2) if r.compare else "—")
        cells += [r.target or "—", verdict(r.holds()) + (f" ({r.shortfall():.2f}× short)" if r.shortfall() else "")]
        table.append(cells)
    header = ["figure", "wsgate", "Node ws peer"]
    if has_nats:
        header.append("nats-server")
    header.append("wsgate / Node")
    if has_nats:
        header.append("wsgate / nats")
    header += ["target (vs. Node)", "holds"]
    add(md_table(header, table))
    add("")
    soak = [r for r in rows if r.figure.startswith("RSS growth")]
    idle_w = get(runs, "idle", W)
    hold = _hold_of(idle_w)
    growth = hold_growth(idle_w)
    if soak and soak[0].holds() is not None and growth:
        g, start, h = growth
        add(
            f"The memory target is judged on wsgate's hold of {fmt(h, ' s', 0)} (it asks for at least {SOAK_TARGET_S} s): "
            f"RSS {fmt(start, ' KiB', 0)} just after the ramp, {fmt(start + g, ' KiB', 0)} at the last sample "
            f"of the hold ({'+' if g >= 0 else ''}{fmt(g, ' KiB', 0)}, {fmt(100 * g / start if start else None, ' %', 2)}); "
            f"it {'holds' if soak[0].holds() else 'does not hold'}."
        )
        add("")
    elif soak and soak[0].holds() is None:
        if hold and hold >= SOAK_TARGET_S:
            add(
                f"wsgate's idle connections were held {fmt(hold, ' s', 0)}, but the run has no RSS samples of "
                "the hold, so the memory target is not judged."
            )
        else:
            add(
                f"The memory target is judged only on a hold of at least {SOAK_TARGET_S} s "
                f"(this run held wsgate's {fmt(hold, ' s', 0) if hold else 'n/a'}); "
                f"run `BENCH_SOAK={SOAK_TARGET_S} bench/run.sh` for it. "
                "The growth shown is the RSS at the last sample of the hold minus the RSS just after the ramp."
            )
        add("")
    add(
        "“× short”: how many times better wsgate's figure must get to meet the target. "
        "The chart shows how many times better than the Node peer wsgate is, beside the target"
        + (", and than nats-server" if has_nats else "")
        + " (memory as peer ÷ wsgate, rates as wsgate ÷ peer)."
    )
    add("")
    add(f"![ratios against the targets]({svg_name})")
    add("")
    floors = [(label, get(runs, scen, "kernel")) for label, scen in (
        ("plain TCP", "floor-tcp"), ("rustls records", "floor-tls"))]
    if any(f for _, f in floors):
        add("## The kernel floor")
        add("")
        add(
            "`wsgate bench floor`: one writer pinned to CPU 0 (where the servers run) writes one "
            f"{fmt(res(floors[0][1] or floors[1][1], 'size'), ' B', 0)} message to each of "
            f"{fmt(res(floors[0][1] or floors[1][1], 'connections'), nd=0)} loopback connections in turn, "
            "as plain TCP or as one rustls record each (no WebSocket, no JSON, no hub); a reader on "
            "CPU 1 drains them; it runs at the start and at the end of the run, and the better of "
            "the two (less CPU per write) is shown. This is what the machine's kernel (and TLS) "
            "cost alone; beside it, "
            "the servers' fan-out to the same number of subscribers from the same run, as ratios: "
            "deliveries/s, delivery p99, and the server's CPU per delivery (user + system over the "
            "measured seconds, from `/proc`) against the floor's CPU per write."
        )
        add("")
        table = []
        for label, f in floors:
            if not f:
                continue
            table.append((label, fmt(res(f, "writes_per_s"), "/s", 0),
                          fmt(res(f, "cpu_us_per_write"), " µs", 2),
                          fmt(res(f, "round_ms_p50"), " ms", 2), fmt(res(f, "round_ms_p99"), " ms", 2)))
        add(md_table(("floor", "writes/s", "CPU per write", "round p50", "round p99"), table))
        add("")
        tls_floor = floors[1][1] or floors[0][1]
        floor_name = "the rustls floor" if floors[1][1] else "the plain TCP floor"
        names = {W: "wsgate", PEER: "Node ws peer", NATS: "nats-server"}
        fan_servers = [srv for srv in (W, PEER, NATS) if any(
            get(runs, f"fanout-w{w}", srv) for w in (100, 1))]
        ratios = []
        for w in (100, 1):
            fans = [get(runs, f"fanout-w{w}", srv) for srv in fan_servers]
            if not any(fans) or not tls_floor:
                continue

            def p99_ms(fan):
                p99 = res(fan, "latency_us", "p99")
                return None if p99 is None else p99 / 1000

            ratios.append([f"window {w}: deliveries/s ÷ floor writes/s"] + [
                fmt(ratio(res(fan, "deliveries_per_s"), res(tls_floor, "writes_per_s")), "×", 2) for fan in fans])
            ratios.append([f"window {w}: delivery p99 ÷ floor round p99"] + [
                fmt(ratio(p99_ms(fan), res(tls_floor, "round_ms_p99")), "×", 2) for fan in fans])
            cpus = [res(fan, "server_cpu_us_per_delivery") for fan in fans]
            if any(c is not None for c in cpus):
                ratios.append([f"window {w}: server CPU per delivery"] + [fmt(c, " µs", 2) for c in cpus])
                ratios.append([f"window {w}: server CPU per delivery ÷ floor CPU per write"] + [
                    fmt(ratio(c, res(tls_floor, "cpu_us_per_write")), "×", 2) for c in cpus])
        if ratios:
            add(md_table([f"against {floor_name}"] + [names[srv] for srv in fan_servers], ratios))
            add("")
    shakes = [(label, get(runs, scen, W)) for label, scen in (
        ("RSA-2048, full", "connect-rsa"), ("RSA-2048, resumed", "connect-resumed-rsa"),
        ("ECDSA P-256, full", "connect-ecdsa"), ("ECDSA P-256, resumed", "connect-resumed-ecdsa"))]
    peers = [srv for srv in (PEER, NATS) if any(
        res(get(runs, scen, srv), "server_cpu_us_per_connect") is not None
        for scen in ("connect-rsa", "connect-ecdsa"))]
    if any(r for _, r in shakes) or peers:
        add("## Handshake CPU")
        add("")
    if any(r for _, r in shakes):
        add(
            "`wsgate bench connect --server-pid` (with `--resume` for resumed TLS sessions): the "
            "gateway's CPU (user + system, from `/proc`) per authenticated connection: TLS handshake, "
            "upgrade, JWT check and `welcome`. On this machine the load generator is the limit on "
            "connects/s, so the CPU per connection is the figure that says what one core can take."
        )
        add("")
        table = []
        for label, r in shakes:
            if not r:
                continue
            cpu = res(r, "server_cpu_us_per_connect")
            table.append((label, fmt(res(r, "connects_per_s"), "/s", 0), fmt(cpu, " µs", 0),
                          fmt(None if not cpu else 1e6 / cpu, "/s", 0)))
        add(md_table(("certificate, handshake", "connects/s", "gateway CPU per connect",
                      "one core's worth"), table))
        add("")
    if peers:
        add(
            "The server's CPU per connect (full handshakes) beside the peers': the Node peer's covers its TLS "
            "handshake, upgrade and JWT check; nats-server's its TLS handshake, upgrade, `INFO` and the "
            "`CONNECT` with its shared token (no JWT) up to the `PONG`."
        )
        add("")
        table = []
        for label, scen in (("RSA-2048", "connect-rsa"), ("ECDSA P-256", "connect-ecdsa")):
            cpus = [res(get(runs, scen, srv), "server_cpu_us_per_connect") for srv in (W, *peers)]
            if all(c is None for c in cpus):
                continue
            table.append([label] + [fmt(c, " µs", 0) for c in cpus])
        names = {PEER: "Node ws peer", NATS: "nats-server"}
        add(md_table(["certificate", "wsgate"] + [names[p] for p in peers], table))
        add("")
    # The single-node figure from the same run as the cluster one: a
    # cluster-only run records it as cluster-base-wN.
    cluster = [
        (w, get(runs, f"cluster-w{w}", "wsgate-redis"),
         get(runs, f"cluster-base-w{w}", W) or get(runs, f"fanout-w{w}", W))
        for w in (100, 1)
    ]
    if any(c for _, c, _ in cluster):
        add("## Two replicas through Redis")
        add("")
        add(
            "Two wsgate replicas share a private `redis-server` (`[cluster] redis_url`); the "
            f"{fmt(res(cluster[0][1] or cluster[1][1], 'subscribers'), nd=0)} subscribers are on replica B, the "
            "publisher on replica A (`wsgate bench fanout --url B --publish-url A`), so every message "
            "goes through the publish script in Redis and back out through B's subscription. Redis and "
            "both replicas share CPU 0, as one server does in the other scenarios; the load generator is "
            "on CPU 1. Beside it, the single-node figure of the same scenario from the same run."
        )
        add("")
        table = []
        for w, c, one in cluster:
            if not c:
                continue
            for label, path, unit, nd, scale in (
                ("deliveries/s", ("deliveries_per_s",), "", 0, 1),
                ("latency p50", ("latency_us", "p50"), " ms", 2, 1e-3),
                ("latency p99", ("latency_us", "p99"), " ms", 2, 1e-3),
            ):
                a, b = res(one, *path), res(c, *path)
                a = None if a is None else a * scale
                b = None if b is None else b * scale
                table.append((f"window {w}: {label}", fmt(a, unit, nd), fmt(b, unit, nd), fmt(ratio(b, a), "×", 2)))
        add(md_table(("figure", "one node", "two replicas via Redis", "Redis / one node"), table))
        add("")
    storms = [(label, get(runs, s, srv)) for label, s, srv in (
        ("one gateway", "resume", W),
        ("two replicas via Redis", "cluster-resume", "wsgate-redis"),
    )]
    if any(run for _, run in storms):
        add("## Reconnect storm: resume after a drain")
        add("")
        add(
            "`wsgate bench resume`: N clients subscribed to one history channel drop their "
            "connections at once (as a drain's 1001 makes them do), messages are published "
            "meanwhile, and all N reconnect at once and subscribe with `since`: on the same "
            "gateway, or on the other replica through Redis. Time until every client has its `ok` "
            "and its replay, the resuming gateway's CPU per client (full TLS handshake, upgrade, "
            "JWT and resume: ECDSA certificate) and Redis commands per client."
        )
        add("")
        table = []
        for label, run in storms:
            if not run:
                continue
            table.append((
                label,
                fmt(res(run, "connections"), nd=0),
                fmt(res(run, "recovered"), nd=0),
                fmt(res(run, "missed_per_client"), nd=0),
                fmt(res(run, "to_live_s"), " s", 2),
                fmt(res(run, "resumes_per_s"), "/s", 0),
                fmt(res(run, "server_cpu_us_per_client"), " µs", 0),
                fmt(res(run, "redis_commands_per_client"), "", 3),
            ))
        add(md_table(("where", "clients", "recovered", "replayed each", "all live after",
                      "resumes/s", "gateway CPU per client", "Redis commands per client"), table))
        add("")
    apis = [(f"HTTP API, 1 connection", get(runs, "api-c1", W)),
            (f"HTTP API, 16 connections", get(runs, "api-c16", W))]
    rated = get(runs, "api-rate", W)
    if rated:
        apis.append((f"HTTP API, 16 connections at {fmt(res(rated, 'rate'), '/s', 0)}", rated))
    if any(run for _, run in apis):
        ws1 = get(runs, "fanout-w1", W)
        add("## Publishing through the HTTP API")
        add("")
        add(
            "`wsgate bench api`: a backend publishing through `POST /api/publish` on N keep-alive "
            "HTTPS connections (one request in flight on each, as a pooled HTTP client does) to "
            "the fan-out scenario's subscribers on one channel. Requests/s is answers `200` per "
            "second; the request time is from sending it to reading the whole answer; delivery "
            "latency is from just before the request to the subscriber's receipt. Unlike the "
            "WebSocket window, an answer does not wait for the deliveries, so the closed loops "
            "run the server to saturation and their latencies include its queues; the fixed rate "
            "shows latency below saturation. Beside them, the WebSocket publisher at the same "
            "fixed rate (`fanout-rate`) and with 1 and 100 messages in flight (`fanout-w1`, `fanout-w100`) from the same run; window 100's "
            "deliveries/s is the server's fan-out limit on this machine."
        )
        add("")
        table = []
        rows_of = [(label, run, True) for label, run in apis]
        ws_rated = get(runs, "fanout-rate", W)
        if ws_rated:
            rows_of.append((f"WebSocket publisher at {fmt(res(ws_rated, 'rate'), '/s', 0)}",
                            ws_rated, False))
        rows_of.append(("WebSocket publisher, window 1", ws1, False))
        rows_of.append(("WebSocket publisher, window 100", get(runs, "fanout-w100", W), False))
        for label, run, is_api in rows_of:
            if not run:
                continue
            rate = res(run, "requests_per_s") if is_api else res(run, "published")
            if not is_api and rate is not None:
                rate = rate / max(res(run, "duration_s") or 1, 1e-9)
            req = (lambda q: None if q is None else q * 1e-3)
            table.append((
                label,
                fmt(res(run, "subscribers"), nd=0),
                fmt(rate, "/s", 0),
                fmt(req(res(run, "request_us", "p50")), " ms", 2) if is_api else "n/a",
                fmt(req(res(run, "request_us", "p99")), " ms", 2) if is_api else "n/a",
                fmt(res(run, "deliveries_per_s"), "/s", 0),
                fmt(req(res(run, "latency_us", "p50")), " ms", 2),
                fmt(req(res(run, "latency_us", "p99")), " ms", 2),
                fmt(res(run, "errors"), nd=0),
            ))
        add(md_table(("publisher", "subscribers", "publishes/s", "request p50", "request p99",
                      "deliveries/s", "delivery p50", "delivery p99", "errors"), table))
        add("")
    if notes:
        add("## Notes")
        add("")
        add("_From `bench/notes.md`._")
        add("")
        add(notes.strip())
        add("")
    add("## Every run")
    add("")
    add(
        "CPU columns: the 90th percentile of one-second samples of each process's CPU use "
        "(100 % is one core) over the whole run, ramp-up included; a server near 100 % is the "
        "bottleneck, a load generator near 100 % may be."
    )
    add("")
    add(details_table(runs))
    add("")
    add("## Commands")
    add("")
    add(
        "`$WORK` is the temporary directory of the run. Setup: `cargo build --release`; "
        "`npm ci` in `bench/peers/node-ws` (when missing); `apt-get install nats-server` (when missing); `ulimit -n` raised to the hard limit; "
        "`wsgate certs --out $WORK/certs` (ECDSA P-256 and its CA); "
        "`openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost "
        "-addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE "
        "-addext extendedKeyUsage=serverAuth -keyout $WORK/certs/rsa.key -out $WORK/certs/rsa.pem` "
        "(self-signed, trusted as its own CA; `CA:FALSE`, since rustls refuses a CA certificate as a server's); a 64-byte HMAC secret; `policies/default.toml`; and "
        "`$WORK/wsgate-ecdsa.toml` / `$WORK/wsgate-rsa.toml` (the same but for "
        "`rsa.pem` / `rsa.key`):"
    )
    add("")
    if mach.get("config"):
        # The file the run used, as `bench/run.sh` wrote it.
        add("```toml")
        add(mach["config"].rstrip("\n"))
        add("```")
        add("")
    if mach.get("nats_config"):
        add(
            "nats-server's `$WORK/nats-ecdsa.conf` (and `$WORK/nats-rsa.conf`, the same but for `rsa.pem` / "
            "`rsa.key`), written from `bench/peers/nats/nats.conf`; `$TOKEN` stands for the token, the text "
            "of `$WORK/hmac.secret`:"
        )
        add("")
        add("```")
        add(mach["nats_config"].rstrip("\n"))
        add("```")
        add("")
    add("Each run: the server command, then the load generator (`$SERVER_PID` is the server's pid); "
        "the server is stopped (SIGTERM) and its port closed before the next run.")
    add("")
    add("```sh")
    for r in runs:
        add(f"# {r.get('scenario')}: {r.get('server')} ({r.get('cert')})")
        add(r.get("server_command", "") + " &")
        add(r.get("bench_command", ""))
    add("```")
    add("")
    return "\n".join(lines)


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def render_svg(rows, quick):
    """A grouped bar chart: per figure, how many times better wsgate is than
    the Node peer (measured) beside the target, and than nats-server when
    the run has it, on one linear axis."""
    groups = [(r.chart[0], r.advantage(), r.chart[1], r.advantage_n()) for r in rows if r.chart]
    has_nats = any(vn is not None for *_, vn in groups)
    width, height = (900 if has_nats else 760), 420
    left, right, top, bottom = 70, 20, 70, 90
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = max([1.0] + [v for _, *vs in groups for v in vs if v is not None])
    scale_max = _nice_ceiling(top_value * 1.15)
    y = lambda v: top + plot_h - plot_h * min(v, scale_max) / scale_max
    out = []
    a = out.append
    a(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">')
    a(f'<rect width="{width}" height="{height}" fill="#fff"/>')
    title = "wsgate vs. the Node ws peer" + (" and nats-server" if has_nats else "") + \
        ": times better (measured) and the target"
    if quick:
        title += " — smoke run"
    a(f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{esc(title)}</text>')
    a(f'<text x="{width / 2}" y="40" text-anchor="middle" fill="#555">memory: peer ÷ wsgate; deliveries and connects: wsgate ÷ peer. Higher is better.</text>')
    # grid
    step = _nice_step(scale_max)
    v = 0.0
    while v <= scale_max + 1e-9:
        yy = y(v)
        a(f'<line x1="{left}" y1="{yy:.1f}" x2="{width - right}" y2="{yy:.1f}" stroke="#e3e3e3"/>')
        a(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="#555">{v:g}×</text>')
        v += step
    a(f'<line x1="{left}" y1="{y(1):.1f}" x2="{width - right}" y2="{y(1):.1f}" stroke="#888" stroke-dasharray="4 3"/>')
    a(f'<text x="{width - right - 2}" y="{y(1) - 4:.1f}" text-anchor="end" fill="#888">parity</text>')
    a(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>')
    a(f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" stroke="#333"/>')
    n = max(1, len(groups))
    gw = plot_w / n
    bw = min(38, gw / (4 if has_nats else 3))
    for i, (label, value, target, value_n) in enumerate(groups):
        x0 = left + i * gw + gw / 2
        bars = [(value, "#2f6db5", "measured"), (target, "#b9b9b9", "target")]
        if has_nats:
            bars.append((value_n, "#8e5ea2", "nats"))
        first = x0 - (len(bars) * bw + (len(bars) - 1) * 4) / 2
        for j, (val, color, _) in enumerate(bars):
            bx = first + j * (bw + 4)
            if val is None:
                text = "(table)" if j == 1 else "n/a"
                a(f'<text x="{bx + bw / 2:.1f}" y="{top + plot_h - 6}" text-anchor="middle" fill="#777" font-size="11">{text}</text>')
                continue
            by = y(val)
            fill = color
            if j == 0 and target is not None:
                fill = "#2f8f4e" if val >= target else "#c0392b"
            a(f'<rect x="{bx:.1f}" y="{by:.1f}" width="{bw:.1f}" height="{top + plot_h - by:.1f}" fill="{fill}"/>')
            a(f'<text x="{bx + bw / 2:.1f}" y="{by - 4:.1f}" text-anchor="middle" font-size="11">{val:.2f}×</text>')
        lines = _wrap(label, 18)
        for k, ln in enumerate(lines):
            a(f'<text x="{x0:.1f}" y="{top + plot_h + 16 + 14 * k}" text-anchor="middle">{esc(ln)}</text>')
    # legend
    lx, ly = left, height - 22
    legend = [("#2f8f4e", "vs. Node, target holds"), ("#c0392b", "vs. Node, target missed"),
              ("#2f6db5", "vs. Node, no target"), ("#b9b9b9", "target")]
    if has_nats:
        legend.append(("#8e5ea2", "vs. nats-server"))
    for color, text in legend:
        a(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{color}"/>')
        a(f'<text x="{lx + 16}" y="{ly}">{esc(text)}</text>')
        lx += 30 + 7 * len(text)
    a("</svg>")
    return "\n".join(out) + "\n"


def _nice_step(vmax):
    for step in (0.5, 1, 2, 5, 10, 20, 50, 100):
        if vmax / step <= 8:
            return step
    return 200


def _nice_ceiling(v):
    step = _nice_step(v)
    return step * -(-v // step)


def _wrap(text, width):
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return lines


def render(a):
    runs = load_results(a.results)
    mach = json.loads(_read(a.machine) or "{}") if a.machine else machine()
    rows = build_rows(runs)
    goals = build_goals(runs)
    quick = str(a.quick) == "1"
    svg_name = os.path.basename(a.svg)
    with open(a.md, "w", encoding="utf-8") as f:
        notes = _read(a.notes) if a.notes else None
        f.write(render_md(runs, mach, rows, quick, svg_name, notes, goals))
    with open(a.svg, "w", encoding="utf-8") as f:
        f.write(render_svg(rows, quick))
    # A short summary on stdout.
    for g in goals:
        print(f"round 2 goal {g['id']}: {g['figure']}: {g['measured_text']}, goal {g['goal_text']}: "
              + ("not measured" if g["holds"] is None else "holds" if g["holds"] else "does not hold"))
    for r in rows:
        values = r.cells or [fmt(v, r.unit, r.nd) for v in (r.w, r.p, r.n)]
        print(f"{r.figure}: wsgate {values[0]}, node {values[1]}, nats {values[2]}"
              + (f", wsgate/node {fmt(r.ratio, '×', 2)}, wsgate/nats {fmt(r.ratio_n, '×', 2)}" if r.compare else "")
              + (f", target {r.target}: {verdict(r.holds()).strip('*')}" if r.target else "")
              + (f" ({r.shortfall():.2f}× short)" if r.shortfall() else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mac = sub.add_parser("machine")
    mac.add_argument("--config", help="the wsgate config the run uses, shown in the report")
    mac.add_argument("--work", help="the run's work directory, shown as $WORK")
    mac.add_argument("--nats", help="the nats-server binary, for its version")
    mac.add_argument("--nats-config", help="the nats-server config the run uses, shown without its token")
    rec = sub.add_parser("record")
    rec.add_argument("--scenario", required=True)
    rec.add_argument("--server", required=True)
    rec.add_argument("--cert", required=True)
    rec.add_argument("--exit", type=int, default=0)
    rec.add_argument("--server-command", default="")
    rec.add_argument("--bench-command", default="")
    rec.add_argument("--stdout", required=True)
    rec.add_argument("--samples")
    rec.add_argument("--work")
    rec.add_argument("--root")
    ren = sub.add_parser("render")
    ren.add_argument("--results", required=True)
    ren.add_argument("--machine")
    ren.add_argument("--md", required=True)
    ren.add_argument("--svg", required=True)
    ren.add_argument("--quick", default="0")
    ren.add_argument("--notes", help="a Markdown file included as the report's Notes section, if it exists")
    a = ap.parse_args(argv)
    if a.cmd == "machine":
        mach = machine()
        if a.config:
            text = _read(a.config)
            if a.work:
                text = text.replace(a.work, "$WORK")
            mach["config"] = "".join(l for l in text.splitlines(True) if not l.startswith("#"))
        if a.nats:
            mach["nats"] = _run(a.nats, "--version")
        if a.nats_config:
            text = _read(a.nats_config)
            if a.work:
                text = text.replace(a.work, "$WORK")
            text = re.sub(r'(?m)^(\s*token:\s*).*$', r'\1"$TOKEN"', text)
            kept = [l for l in text.splitlines(True) if not l.lstrip().startswith("#")]
            mach["nats_config"] = re.sub(r"\n{3,}", "\n\n", "".join(kept)).strip("\n") + "\n"
        print(json.dumps(mach))
    elif a.cmd == "record":
        record(a)
    else:
        render(a)


if __name__ == "__main__":
    main()
