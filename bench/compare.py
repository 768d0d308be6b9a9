"""fraudstream beside its peers: one run, one broker, one table. Run by `bench/compare`, which
builds and starts what is needed; writes bench/results/compare-<time>.{json,md,png} (and
each stream processor's rate timeline, compare-<time>-<system>-rates.png) and prints
the Markdown table.

Systems (`--systems`, run one after another on the same broker, data and machine):
- `fraudstream-eos`, `fraudstream-alo`: the release binary (bench/e2e.py's `Scorer`,
  docs/fraudstream.toml) under exactly-once and at-least-once, with two workers
  (`processing.workers`) as the Kafka Streams peer has two stream threads; `-w1`: one worker
  (not in the default run);
- `streams-eos`, `streams-alo`: the Kafka Streams peer (bench/peers/kafka-streams/run) under
  exactly_once_v2 and at_least_once;
- `http`: the HTTP scoring peer (bench/peers/http/run), whose own figures are merged.

The two stream processors are driven exactly alike, by bench/e2e.py's functions: unkeyed JSON
records picked at random from bench/gen_payloads.py's files by Kafka's
kafka-producer-perf-test, fresh topics per system and phase (`--partitions` each), verdicts
read by a read_committed reader; latency = read time - the verdict's record timestamp, which
both systems set to their transaction's (the moment the perf tool sent it). Per system:

- backlog: `--backlog` transactions produced first, as fast as the tool can, then the system
  started on them; transactions/s from its first verdict to its last (start-up apart; the JSON
  has both). Again with `--navigation-per-tx` navigation events per transaction, drained once
  the last verdict is read and the system has read all the navigation too (the Kafka Streams
  peer answers the purchases before the browsing: `navigation_read_by_last_verdict`,
  `drained_after_last_verdict_s`); its CPU is counted to then.
- fixed rates (`--rates`, `--seconds` each, transactions only, like the HTTP peer's requests),
  after a `--warmup-seconds` run at the first rate that is not counted (the JVM compiles its
  hot paths then; fraudstream warms its caches): achieved transactions/s, latency
  p50/p99/p99.9/max. A rate is not sustained when fewer than 90 % of its transactions are
  answered within 2 s of the last one sent, or when the unanswered transactions grow by more
  than one second's worth over the phase's second half; the ladder stops after that rate.
- cost: CPU seconds (utime + stime, /proc) of the scorer process and of the broker per 100,000
  transactions answered, transactions per scorer CPU-second, peak resident memory (VmHWM).

The HTTP peer's "backlog" is its saturation throughput (a closed loop of requests, as many as
it answers); it has no broker and no navigation events.
"""

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import REPO, Reader, Scorer, pct, perf_test, proc_cpu, system_cpu, system_hwm, wait_answered  # noqa: E402

SYSTEMS = {
    # Two workers (processing.workers = 2), as the Kafka Streams peer has two stream threads.
    "fraudstream-eos": ("fraudstream", "exactly-once"),
    "fraudstream-alo": ("fraudstream", "at-least-once"),
    # One worker, one processing thread. Not in the default run.
    "fraudstream-eos-w1": ("fraudstream", "exactly-once"),
    "fraudstream-alo-w1": ("fraudstream", "at-least-once"),
    "streams-eos": ("streams", "exactly_once_v2"),
    "streams-alo": ("streams", "at_least_once"),
    "http": ("http", None),
}
# Verdicts read this long after the last transaction of a rate was sent still count as in time.
GRACE_S = 2.0


class StreamsPeer:
    """The Kafka Streams peer on its own topics and application id; the same interface as
    e2e.Scorer (topics, proc, start, stop, timing)."""

    def __init__(self, args, run, guarantee):
        self.args, self.run, self.guarantee, self.proc = args, run, guarantee, None
        self.topics = {t: f"{run}-{t}" for t in ("transactions", "navigation", "verdicts", "dlq")}
        admin = AdminClient({"bootstrap.servers": args.bootstrap})
        fs = admin.create_topics([NewTopic(name, args.partitions if t != "dlq" else 1, 1)
                                  for t, name in self.topics.items()])
        for f in fs.values():
            f.result()
        self.state = f"/tmp/{run}-state"
        self.log_path = f"/tmp/{run}.log"

    def start(self):
        env = dict(os.environ, FRAUDSTREAM__STATE__HMAC_SECRET=os.urandom(16).hex())
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [self.args.peer_run, "--bootstrap", self.args.bootstrap, "--guarantee", self.guarantee,
             "--transactions", self.topics["transactions"], "--navigation", self.topics["navigation"],
             "--verdicts", self.topics["verdicts"], "--dead-letter", self.topics["dlq"],
             "--application-id", self.run, "--state-dir", self.state,
             # fraudstream's default for the guarantee (processing.commit-interval-ms).
             "--commit-interval-ms", "1000" if self.guarantee == "at_least_once" else "100"],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log, cwd=REPO)
        # Ready when Kafka Streams reports RUNNING (App logs each state change), as fraudstream
        # is when /readyz answers: partitions assigned, stores restored.
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the Kafka Streams peer exited ({self.proc.returncode}); log: {self.log_path}")
            with open(self.log_path) as f:
                if "-> RUNNING" in f.read():
                    return
            time.sleep(0.2)
        sys.exit(f"the Kafka Streams peer not RUNNING after 180 s; log: {self.log_path}")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def timing(self):
        """What the peer has read (its consumer group's committed offsets, at most a commit
        interval behind) of the navigation topic and of its repartition topic, and what it
        has written to the latter: the figures fraudstream's metrics give for
        `navigation_read_by_last_verdict`."""
        repartition = f"{self.run}-events-repartition"
        c = Consumer({"bootstrap.servers": self.args.bootstrap, "group.id": self.run})
        try:
            def read(topic):
                tps = [TopicPartition(topic, p) for p in range(self.args.partitions)]
                return sum(max(0, tp.offset) for tp in c.committed(tps, timeout=10))

            written = sum(c.get_watermark_offsets(TopicPartition(repartition, p), timeout=10)[1]
                          for p in range(self.args.partitions))
            return {"consumed_navigation": read(self.topics["navigation"]),
                    "consumed_repartition": read(repartition), "repartitioned": written}
        finally:
            c.close()


def make_system(args, name, kind, guarantee, run):
    if kind == "fraudstream":
        a = copy.copy(args)
        a.guarantee = guarantee
        a.workers = 1 if name.endswith("-w1") else 2
        return Scorer(a, run, args.partitions)
    return StreamsPeer(args, run, guarantee)


def stop_quietly(system):
    """Stops a system that may be stopped already (e2e.Scorer's stop expects it running)."""
    if system is not None and system.proc is not None and system.proc.poll() is None:
        system.stop()


def clean_up(args, run):
    """Deletes the topics of `run` (inputs, verdicts and the systems' internal topics, which all
    start with its name) and its state directory, so each phase starts on an empty broker and
    the disk does not fill up."""
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"{run}-")]
    if names:
        for f in admin.delete_topics(names, operation_timeout=30).values():
            try:
                f.result()
            except Exception as e:  # a topic already gone is fine
                print(f"deleting a topic of {run}: {e}", file=sys.stderr)
    shutil.rmtree(f"/tmp/{run}-state", ignore_errors=True)


def rate_phase(args, system, reader, rate, seconds, timeline=None):
    """`rate` transactions/s for `seconds`, then until all are answered (or --drain-timeout).
    `timeline`: a list to append (rate, time of the first record sent, samples, lag) to."""
    start = len(reader.samples)
    topic = system.topics["transactions"]
    watermarks = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"compare-lag-{time.time_ns()}"})

    def produced():
        return sum(watermarks.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                   for p in range(args.partitions))

    base = produced()
    n = int(rate * seconds)
    cpu0, bcpu0 = system_cpu(system), proc_cpu(args.broker_pid)
    tool = perf_test(args, topic, n, rate, args.tx_payload)
    t_first, lag = None, []  # lag: (s since the first record sent, transactions in the topic not answered)
    # With --split-latency, fraudstream: every 0.25 s, (s since the first record sent, sent, read
    # from the transactions topic, read from the repartition topic, answered): a stall where the
    # reads stop is before processing (the broker, the fetch, the forward's round trip), one
    # where they go on is in it. Not by default: the measured run polls no system's metrics.
    metrics = getattr(system, "metrics", None) if reader.split else None
    read0 = inputs_read(metrics) if metrics else (0, 0)
    trace = []
    while tool.poll() is None:
        time.sleep(0.25)
        now, sent = time.time(), produced() - base
        if t_first is None and sent > 0:
            t_first = now
        if t_first is not None:
            answered = len(reader.samples) - start
            lag.append((now - t_first, sent - answered))
            if metrics:
                read = inputs_read(metrics)
                trace.append((round(now - t_first, 2), sent, read[0] - read0[0], read[1] - read0[1], answered))
    t_sent = time.time()
    tool_line = " ".join(tool.communicate()[0].strip().splitlines()[-1:])
    time.sleep(max(0.0, t_sent + GRACE_S - time.time()))
    in_time = sum(1 for s in reader.samples[start:] if s[0] <= t_sent + GRACE_S)
    # Least-squares slope of the unanswered transactions over the second half of the phase.
    half = [(t, v) for t, v in lag if t >= lag[-1][0] / 2] if lag else []
    slope = 0.0
    if len(half) >= 3:
        mt = sum(t for t, _ in half) / len(half)
        mv = sum(v for _, v in half) / len(half)
        den = sum((t - mt) ** 2 for t, _ in half)
        slope = sum((t - mt) * (v - mv) for t, v in half) / den if den else 0.0
    growth = slope * (half[-1][0] - half[0][0]) if len(half) >= 3 else 0.0
    t_end = wait_answered(reader, start + n, args.drain_timeout)
    cpu, bcpu = system_cpu(system) - cpu0, proc_cpu(args.broker_pid) - bcpu0
    watermarks.close()
    samples = reader.samples[start:start + n]
    # Over the time the perf tool took to send them (the verdicts' timestamps are the sends),
    # never less than the phase: a tool starved of CPU that sends late lowers the rate achieved.
    sent_at = [s[0] - s[1] / 1000 for s in samples]
    span = max(sent_at) - min(sent_at) if sent_at else 0.0
    achieved = min(n, in_time) / max(seconds, span)
    got = len(samples)
    per = 100_000 / max(1, got)
    phase = {
        "rate": rate, "sent": n, "verdicts": got, "achieved": round(achieved, 1),
        **e2e.latencies(samples),
        "peak_lag": int(max((v for _, v in lag), default=0)),
        "lag_growth_second_half": int(growth),
        # From the perf tool's exit to the phase's last verdict read.
        "last_verdict_after_s": round(max((s[0] for s in samples), default=t_end) - t_sent, 1),
        "cpu_s_per_100k": round(cpu * per, 2), "broker_cpu_s_per_100k": round(bcpu * per, 2),
        "peak_rss_mb": round(system_hwm(system) / 2**20, 1),
        "perf_test": tool_line,
    }
    if reader.split:
        # Where the slow verdicts' time went: after scoring (producing, the broker, the
        # reader) or before (the perf tool, the broker, fetching, processing).
        after = reader.after_scoring[start:start + n]
        slow = [(ms, a) for (_, ms), a in zip(samples, after) if a is not None and ms > 250]
        done = sorted(a for a in after if a is not None)
        phase["after_scoring_p50_ms"] = round(pct(done, 0.5), 1)
        phase["after_scoring_p99_ms"] = round(pct(done, 0.99), 1)
        phase["over_250ms"] = len(slow)
        phase["over_250ms_after_scoring_share"] = (round(sum(a for _, a in slow) / sum(ms for ms, _ in slow), 3)
                                                   if slow else None)
    if trace:
        phase["trace"] = trace
    phase["fell_behind"] = fell_behind(phase)
    if timeline is not None:
        timeline.append((rate, t_first or t_sent, samples, lag))
    return phase


def inputs_read(metrics):
    """Records fraudstream has read from its transactions topic and from its repartition topic."""
    t = e2e.scorer_timing(metrics)
    return t.get("consumed_transactions", 0), t.get("consumed_repartition", 0)


def run_stream_system(args, name, kind, guarantee, run):
    """Backlog (without, then with navigation), then the rate ladder, each on fresh topics."""
    out = {"system": name, "guarantee": guarantee}
    phases = [("backlog", 0)] + ([("backlog_nav", args.navigation_per_tx)] if args.navigation_per_tx else [])
    for key, nav in phases:
        r = f"{run}-{name}-{key.replace('_', '-')}"
        print(f"{name}: {args.backlog:,} transactions" + (f" + {args.backlog * nav:,} navigation events" if nav else "")
              + " produced, then drained", file=sys.stderr, flush=True)
        system = make_system(args, name, kind, guarantee, r)
        try:
            out[key] = e2e.backlog(args, system, key, args.backlog, nav, args.backlog_timeout)
        finally:
            stop_quietly(system)
            clean_up(args, r)
        print(json.dumps(out[key]), file=sys.stderr, flush=True)
    if args.rates:
        r = f"{run}-{name}-rates"
        system = make_system(args, name, kind, guarantee, r)
        reader = None
        out["rates"] = []
        try:
            system.start()
            reader = Reader(args, system.topics["verdicts"], args.partitions, split=args.split_latency)
            reader.start()
            if args.warmup_seconds:
                print(f"{name}: warm-up, {args.rates[0]:,} tx/s for {args.warmup_seconds} s", file=sys.stderr, flush=True)
                rate_phase(args, system, reader, args.rates[0], args.warmup_seconds)
            timeline = []
            for rate in args.rates:
                print(f"{name}: {rate:,} tx/s for {args.seconds} s", file=sys.stderr, flush=True)
                p = rate_phase(args, system, reader, rate, args.seconds, timeline)
                out["rates"].append(p)
                print(json.dumps(p), file=sys.stderr, flush=True)
                if p["fell_behind"]:
                    break
            os.makedirs(args.out, exist_ok=True)
            e2e.plot_timeline([(f"{name}: {rate:,} tx/s", t0, samples, lag) for rate, t0, samples, lag in timeline],
                              os.path.join(args.out, f"{run}-{name}-rates.png"))
        finally:
            if reader is not None:
                reader.stopped = True
                reader.join()
                reader.c.close()
            out["timing"] = system.timing() if system.proc is not None and system.proc.poll() is None else {}
            stop_quietly(system)
            clean_up(args, r)
    return out


def run_http(args, run):
    path = os.path.join(args.work, f"{run}-http.json")
    cmd = [args.http_run, "--rates", ",".join(map(str, args.rates or [1000])), "--seconds", str(int(args.seconds)),
           "--saturation-seconds", str(int(args.http_saturation_seconds or args.seconds)), "--out", path]
    print(f"http: {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    with open(path) as f:
        result = json.load(f)
    if not args.rates:
        result["phases"] = []
    return result


# -- the figures side by side ------------------------------------------------------------------

def fmt(v, unit="", digits=0):
    if v is None:
        return "–"
    if isinstance(v, float) and v != v:  # NaN: no samples
        return "–"
    return f"{v:,.{digits}f}{unit}"


def latency(ms):
    if ms is None or ms != ms:
        return "–"
    return f"{ms / 1000:,.2f} s" if ms >= 1000 else f"{ms:,.0f} ms" if ms >= 10 else f"{ms:,.1f} ms"


def fell_behind(p):
    """A rate phase of a stream processor that did not keep up: under 90 % of the rate
    achieved, the lag still growing by more than a second of input over the second half,
    verdicts missing, or at some moment more than two seconds of input waiting."""
    rate = p["rate"]
    return (p["achieved"] < 0.9 * rate or p["lag_growth_second_half"] > rate
            or p["verdicts"] < p["sent"] or p["peak_lag"] > 2 * rate)


def rows(result):
    """Per system: the summary row and the rate rows, in one shape for the stream processors
    and the HTTP peer."""
    summary, per_rate = [], []
    for name, s in result["systems"].items():
        if "error" in s:
            continue
        if name == "http":
            sat = s["saturation"]
            cpu = sat.get("server_cpu_s_per_100k")
            rates = [{"rate": p["rate"], "achieved": p["achieved"], "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"],
                      "p999_ms": p["p999_ms"], "max_ms": p["max_ms"], "cpu_s_per_100k": p["server_cpu_s_per_100k"],
                      "broker_cpu_s_per_100k": None, "fell_behind": p["fell_behind"],
                      "note": f"{p['errors']} errors" if p["errors"] else ""} for p in s["phases"]]
            summary.append({"system": name, "backlog": sat["achieved"], "backlog_note": "saturation, closed loop",
                            "nav": None, "tx_per_cpu": 100_000 / cpu if cpu else None, "tx_per_total_cpu": None,
                            "cpu": cpu, "broker_cpu": None, "rss": s.get("peak_rss_mb"), "rates": rates})
        else:
            b, bn = s.get("backlog", {}), s.get("backlog_nav")
            rates = [dict(p, note="", fell_behind=fell_behind(p)) for p in s.get("rates", [])]
            cpu, bcpu = b.get("cpu_s_per_100k"), b.get("broker_cpu_s_per_100k")
            rss = max([b.get("peak_rss_mb") or 0, (bn or {}).get("peak_rss_mb") or 0]
                      + [p.get("peak_rss_mb") or 0 for p in rates]) or None
            summary.append({"system": name, "backlog": b.get("drain_tx_per_s"), "backlog_note": "",
                            "nav": bn, "tx_per_cpu": 100_000 / cpu if cpu else None,
                            "tx_per_total_cpu": 100_000 / (cpu + bcpu) if cpu else None,
                            "cpu": cpu, "broker_cpu": bcpu, "rss": rss, "rates": rates})
        for p in summary[-1]["rates"]:
            per_rate.append(dict(p, system=name))
    return summary, per_rate


def sustained(rates):
    ok = [p["rate"] for p in rates if not p["fell_behind"]]
    return max(ok) if ok else None


def markdown(result):
    a = result["scale"]
    summary, per_rate = rows(result)
    rate_cols = a["rates"]
    nav_per_tx = a["navigation_per_tx"]
    scale = f"{a['partitions']} partitions; backlog {a['backlog']:,} transactions"
    if nav_per_tx:
        scale += f", then the same with {nav_per_tx} navigation events per transaction"
    if rate_cols:
        scale += (f"; rates {', '.join(f'{r:,}' for r in rate_cols)} tx/s (transactions only) for "
                  f"{a['seconds']:g} s each after a {a['warmup_seconds']:g}-s warm-up")
    out = [f"`{result['command']}`", "",
           f"{scale}; {result['machine']['cores']} cores; {result['wall_s'] / 60:.1f} min. Backlog tx/s: first "
           "verdict to last (start-up apart); with navigation, to the last verdict and all the navigation read. Latency: produced → verdict read (read_committed), of the records "
           f"produced from {e2e.SETTLE_S:g} s after a rate's first on (a new perf-test JVM starts then, bench/e2e.py's "
           "SETTLE_S); `p99 all` includes them. CPU: utime + "
           "stime of the scorer process (fraudstream; the peer's JVM; gunicorn's master and workers) and of the "
           "broker, per 100,000 transactions of the backlog without navigation (HTTP: of the saturation run), and "
           "with it in the navigation column.", ""]
    head = ["system", "backlog tx/s"] + ([f"with {nav_per_tx} nav/tx: tx/s (+ nav/s); scorer CPU-s / 100k"]
                                          if nav_per_tx else []) + [
            "tx per scorer CPU-s", "tx per scorer + broker CPU-s", "scorer CPU-s / 100k", "broker CPU-s / 100k",
            "peak RSS", "highest rate sustained"] + [f"p99 at {r:,}/s" for r in rate_cols]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        nav = s["nav"]
        nav_cell = (f"{fmt(nav.get('drain_tx_per_s'))} (+ {fmt(nav.get('drain_nav_per_s'))}); "
                    f"{fmt(nav.get('cpu_s_per_100k'), digits=1)}" if nav else "–")
        by_rate = {p["rate"]: p for p in s["rates"]}
        p99s = [(latency(by_rate[r]["p99_ms"]) + (" (fell behind)" if by_rate[r]["fell_behind"] else ""))
                if r in by_rate else "–" for r in rate_cols]
        backlog = fmt(s["backlog"]) + (f" ({s['backlog_note']})" if s["backlog_note"] else "")
        cells = [s["system"], backlog] + ([nav_cell] if nav_per_tx else []) + [
            fmt(s["tx_per_cpu"]), fmt(s["tx_per_total_cpu"]), fmt(s["cpu"], digits=1), fmt(s["broker_cpu"], digits=1),
            fmt(s["rss"], " MB"), fmt(sustained(s["rates"]), " tx/s")] + p99s
        out.append("| " + " | ".join(cells) + " |")
    failed = [f"{name} failed: {s['error']}" for name, s in result["systems"].items() if "error" in s]
    if failed:
        out += [""] + failed
    if not per_rate:
        return "\n".join(out) + "\n"
    out += ["", "| system | offered tx/s | achieved | p50 | p99 | p99.9 | max | p99 all | scorer CPU-s / 100k | broker CPU-s / 100k | |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in per_rate:
        note = "fell behind" if p["fell_behind"] else ""
        note = "; ".join(x for x in (note, p.get("note")) if x)
        out.append(f"| {p['system']} | {p['rate']:,} | {fmt(p['achieved'])} | {latency(p['p50_ms'])} | "
                   f"{latency(p['p99_ms'])} | {latency(p['p999_ms'])} | {latency(p['max_ms'])} | "
                   f"{latency(p.get('p99_all_ms'))} | {fmt(p['cpu_s_per_100k'], digits=1)} | {fmt(p['broker_cpu_s_per_100k'], digits=1)} | {note} |")
    return "\n".join(out) + "\n"


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _, per_rate = rows(result)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in result["systems"]:
        ps = [p for p in per_rate if p["system"] == name]
        if not ps:
            continue
        xs = [p["rate"] for p in ps]
        line, = left.plot(xs, [p["achieved"] for p in ps], "o-", label=name)
        right.plot(xs, [max(0.1, p["p99_ms"]) for p in ps if p["p99_ms"] == p["p99_ms"]], "o-",
                   color=line.get_color(), label=name)
        for p in ps:
            if p["fell_behind"]:
                left.plot(p["rate"], p["achieved"], "x", color="black", markersize=10)
                if p["p99_ms"] == p["p99_ms"]:
                    right.plot(p["rate"], max(0.1, p["p99_ms"]), "x", color="black", markersize=10)
    rates = result["scale"]["rates"]
    left.plot(rates, rates, ":", color="grey", label="offered")
    left.set_xlabel("offered, transactions/s")
    left.set_ylabel("achieved, transactions/s")
    left.set_title("throughput per rate (x: fell behind)")
    left.legend()
    right.set_yscale("log")
    right.set_xlabel("offered, transactions/s")
    right.set_ylabel("p99 produced → verdict, ms")
    right.set_title("p99 latency per rate")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(rates)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


class Terminated(BaseException):
    """SIGTERM: ends the run (after the `finally` blocks stop what runs), unlike one system's failure."""


def terminate(*_):
    raise Terminated()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render", metavar="JSON",
                    help="only write the table and plot of an earlier run's JSON beside it")
    ap.add_argument("--bootstrap")
    ap.add_argument("--bin", help="fraudstream's release binary")
    ap.add_argument("--broker-pid", type=int)
    ap.add_argument("--payloads", help="directory of gen_payloads.py's files")
    ap.add_argument("--peer-run", default=os.path.join(REPO, "bench", "peers", "kafka-streams", "run"))
    ap.add_argument("--http-run", default=os.path.join(REPO, "bench", "peers", "http", "run"))
    ap.add_argument("--systems", default=",".join(n for n in SYSTEMS if not n.endswith("-w1")))
    ap.add_argument("--backlog", type=int, default=1_000_000, help="transactions in each backlog")
    ap.add_argument("--navigation-per-tx", type=int, default=10,
                    help="navigation events per transaction in the second backlog (0: no second backlog)")
    ap.add_argument("--rates", default="1000,5000,10000,20000", help="transactions/s; empty: no rate phases")
    ap.add_argument("--split-latency", action="store_true",
                    help="diagnose the rates' latency: how much of it, and of the slow verdicts' (over 250 ms), "
                         "came after scoring (the reader parses each JSON verdict's scored_at), and, for "
                         "fraudstream, what it read from each input every 0.25 s (its metrics polled)")
    ap.add_argument("--seconds", type=float, default=30, help="length of each rate phase")
    ap.add_argument("--warmup-seconds", type=float, default=10)
    ap.add_argument("--http-saturation-seconds", type=float, default=None, help="default: --seconds")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--backlog-timeout", type=float, default=1800, help="longest drain of a backlog, s")
    ap.add_argument("--drain-timeout", type=float, default=300,
                    help="longest wait for the rest of a rate phase's verdicts once sent, s")
    ap.add_argument("--command", default="bench/compare", help="the command line, for the report")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--work", default="/tmp")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            report(json.load(f), os.path.splitext(args.render)[0])
        return
    missing = [f"--{a.replace('_', '-')}" for a in ("bootstrap", "bin", "broker_pid", "payloads")
               if getattr(args, a) is None]
    if missing:
        ap.error(f"required: {', '.join(missing)}")
    args.systems = [s for s in args.systems.split(",") if s]
    for s in args.systems:
        if s not in SYSTEMS:
            sys.exit(f"unknown system {s} (known: {', '.join(SYSTEMS)})")
    args.rates = [int(r) for r in args.rates.split(",") if r]
    args.tx_payload = os.path.join(args.payloads, "transactions.jsonl")
    args.nav_payload = os.path.join(args.payloads, "navigation.jsonl")
    # The default SIGTERM ends Python without running `finally`: make it an exit that does, so
    # the system running is stopped and its topics deleted.
    signal.signal(signal.SIGTERM, terminate)

    stamp = int(time.time())
    run = f"compare-{stamp}"
    result = {"run": run, "command": args.command,
              "machine": {"cores": os.cpu_count(),
                          "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                          "loadavg_at_start": os.getloadavg()},
              "scale": {"backlog": args.backlog, "navigation_per_tx": args.navigation_per_tx, "rates": args.rates,
                        "seconds": args.seconds, "warmup_seconds": args.warmup_seconds,
                        "partitions": args.partitions},
              "systems": {}}
    t_start = time.time()
    for name in args.systems:
        kind, guarantee = SYSTEMS[name]
        t = time.time()
        try:
            if kind == "http":
                result["systems"][name] = run_http(args, run)
            else:
                result["systems"][name] = run_stream_system(args, name, kind, guarantee, run)
        except (Exception, SystemExit) as e:
            # One system that fails (not ready, a crash, a peer's script failing) is reported and
            # the others still run; Ctrl-C and SIGTERM (Terminated) end the whole run.
            print(f"{name} failed: {e}", file=sys.stderr, flush=True)
            result["systems"][name] = {"error": str(e) or type(e).__name__}
        result["systems"][name]["wall_s"] = round(time.time() - t, 1)
    result["wall_s"] = round(time.time() - t_start, 1)

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, run)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    report(result, base)


def report(result, base):
    """Writes `base`.md (the table) and `base`.png (the plot) of `result`."""
    table = markdown(result)
    with open(base + ".md", "w") as f:
        f.write(table)
    if rows(result)[1]:
        plot(result, base + ".png")
    print(table)
    print(f"results: {base}.json, {base}.md" + (f", {base}.png" if os.path.exists(base + ".png") else "")
          + f"; {result['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    try:
        main()
    except Terminated:
        sys.exit(143)
