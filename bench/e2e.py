"""End-to-end benchmark: fraudstream (release build) on Apache Kafka, driven by Kafka's own
kafka-producer-perf-test (org.apache.kafka.tools.ProducerPerformance) with payload files of
realistic transactions and navigation events (bench/gen_payloads.py: about 9 page events per
purchase), sent unkeyed as that tool sends them: fraudstream re-keys them by customer through
its repartition topic. A read_committed reader (confluent-kafka) measures the latency of each
verdict as read time minus its record timestamp, which is the transaction's own (fraudstream
gives a verdict its input's timestamp, as Kafka Streams does), i.e. the moment the perf tool
sent it. Run by `bench/e2e`, which builds and starts what is needed; writes
bench/results/e2e-<run>.{json,png} and prints a table.

Phases:
- `rate:R`: R transactions/s and their navigation events for --seconds.
- `spike:B`: B tx/s for 20 s, 10 x B for 30 s ("Black Friday"), B again for 60 s: the peak
  lag and the time from the end of the spike until the lag is back under 1 s of the base rate.
- `backlog:N`: N transactions (and, with --navigation, their navigation events) produced first
  as fast as the tool can, then a second fraudstream started on them: the time to answer them
  all is the unthrottled throughput.
- `floor`: Kafka's EndToEndLatency (produce one record, consume it, repeat) on this broker: the
  latency floor under any consumer of it.

Per phase: transactions/s, latency p50/p99/p99.9/max (of the records produced from SETTLE_S
after the phase's first; `p99 all` and `max_all_ms` of every record), peak lag, CPU seconds per 100k
transactions of the scorer and of the broker (utime + stime from /proc), peak resident memory
of the scorer (VmHWM).
"""

import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

TICK = os.sysconf("SC_CLK_TCK")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def pct(sorted_values, p):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


# Each fixed-rate phase starts a new kafka-producer-perf-test JVM on the same 2 cores: its
# first records go out while it starts and compiles, and reach every system late and in a
# burst (about 0.3 s of records at 100-150 ms, once per phase; a p99 of a 20-s phase is its
# slowest 0.2 s). The latency figures are of the records produced from SETTLE_S after the
# phase's first on; `p99_all_ms` and `max_all_ms` include them.
SETTLE_S = 3.0


def latencies(samples):
    """Latency figures of a phase's reader samples (read time s, latency ms)."""
    sent = [t - ms / 1000 for t, ms in samples]
    first = min(sent, default=0.0)
    steady = sorted(ms for (_, ms), at in zip(samples, sent) if at >= first + SETTLE_S)
    every = sorted(ms for _, ms in samples)
    return {
        "p50_ms": round(pct(steady, 0.5), 1), "p99_ms": round(pct(steady, 0.99), 1),
        "p999_ms": round(pct(steady, 0.999), 1), "max_ms": round(steady[-1], 1) if steady else None,
        "p99_all_ms": round(pct(every, 0.99), 1), "max_all_ms": round(every[-1], 1) if every else None,
    }


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def system_cpu(system):
    """CPU seconds of a system's process (a Scorer, or a peer)."""
    return proc_cpu(system.proc.pid)


def system_hwm(system):
    return proc_hwm(system.proc.pid)


def kafka_tool(name, *tool_args):
    """One of Kafka's command-line tools (scripts/kafka-cli)."""
    return subprocess.Popen([os.path.join(REPO, "scripts", "kafka-cli"), name, *tool_args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def perf_test(args, topic, records, rate, payload):
    """kafka-producer-perf-test, unkeyed records picked at random from `payload`."""
    return kafka_tool("kafka-producer-perf-test",
                      "--topic", topic, "--num-records", str(int(records)),
                      "--throughput", str(int(rate)), "--payload-file", payload,
                      "--producer-props", f"bootstrap.servers={args.bootstrap}", "acks=all",
                      "linger.ms=5", "batch.size=65536")


class Scorer:
    """fraudstream on its own topics and group: one process with `args.workers` processing
    loops (processing.workers), its own state directory and metrics port."""

    def __init__(self, args, run, partitions):
        self.run = run
        self.topics = {t: f"{run}-{t}" for t in ("transactions", "navigation", "verdicts", "dlq", "labels", "blocklist")}
        admin = AdminClient({"bootstrap.servers": args.bootstrap})
        fs = admin.create_topics([NewTopic(name, partitions if t in ("transactions", "navigation", "verdicts") else 1, 1)
                                  for t, name in self.topics.items()])
        for f in fs.values():
            f.result()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.metrics = f"127.0.0.1:{sock.getsockname()[1]}"
        self.args, self.proc = args, None

    def start(self):
        self.log = open(f"/tmp/{self.run}.log", "w")
        env = dict(os.environ,
                   FRAUDSTREAM__BROKERS=self.args.bootstrap, FRAUDSTREAM__GROUP_ID=self.run,
                   FRAUDSTREAM__TOPICS__TRANSACTIONS=self.topics["transactions"],
                   FRAUDSTREAM__TOPICS__NAVIGATION=self.topics["navigation"],
                   FRAUDSTREAM__TOPICS__VERDICTS=self.topics["verdicts"],
                   FRAUDSTREAM__TOPICS__DEAD_LETTER=self.topics["dlq"],
                   FRAUDSTREAM__TOPICS__LABELS=self.topics["labels"],
                   FRAUDSTREAM__TOPICS__BLOCKLIST=self.topics["blocklist"],
                   FRAUDSTREAM__METRICS__LISTEN=self.metrics,
                   FRAUDSTREAM__PROCESSING__GUARANTEE=self.args.guarantee,
                   FRAUDSTREAM__PROCESSING__WORKERS=str(getattr(self.args, "workers", 1)),
                   FRAUDSTREAM__STATE__PATH=f"/tmp/{self.run}-state",
                   FRAUDSTREAM__STATE__HMAC_SECRET=os.urandom(16).hex(), RUST_LOG="warn")
        self.proc = subprocess.Popen([self.args.bin, "run", "--config", "docs/fraudstream.toml"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=self.log, cwd=REPO)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"fraudstream exited ({self.proc.returncode}); log: /tmp/{self.run}.log")
            try:
                if urllib.request.urlopen(f"http://{self.metrics}/readyz", timeout=1).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        sys.exit(f"fraudstream not ready; log: /tmp/{self.run}.log")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)

    def timing(self):
        return scorer_timing(self.metrics)


class Reader(threading.Thread):
    """Reads verdicts (read_committed); latency = read time - the record's timestamp. With
    `split`, also how much of it came after the verdict's `scored_at` (JSON verdicts):
    `after_scoring[i]` (ms, or None) for `samples[i]`."""

    def __init__(self, args, topic, partitions, split=False):
        super().__init__(daemon=True)
        self.c = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"e2e-reader-{time.time_ns()}",
                           "enable.auto.commit": False, "isolation.level": "read_committed"})
        self.c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        self.samples = []  # (read time s, latency ms)
        self.split = split
        self.after_scoring = []
        self.stopped = False

    def run(self):
        while not self.stopped:
            # consume() returns once it has 2,000 records or its timeout is over: each verdict
            # read in that window waits for its end, so the timeout is part of every latency
            # figure (50 ms here until this was found: about 25 ms added to each p50).
            msgs = self.c.consume(2000, 0.002)
            now = time.time()
            for m in msgs:
                if m.error():
                    continue
                self.samples.append((now, now * 1000 - m.timestamp()[1]))
                if self.split:
                    self.after_scoring.append(after_scoring(m.value(), now))


def after_scoring(value, now):
    """ms from a JSON verdict's `scored_at` (RFC 3339, UTC) to `now` (s), or None."""
    i = value.find(b'"scored_at":"') if value else -1
    if i < 0:
        return None
    end = value.find(b'"', i + 13)
    try:
        scored = datetime.datetime.fromisoformat(value[i + 13:end].decode().replace("Z", "+00:00"))
    except ValueError:
        return None
    return now * 1000 - scored.timestamp() * 1000


def scorer_timing(metrics_addr):
    """Where the scorer's time went, from its histograms: seconds in commits, in batch
    processing, in scoring, and the mean merge wait."""
    try:
        text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for name in ("commit_duration", "batch_duration", "scoring_duration", "merge_wait"):
        s = re.search(rf"^fraudstream_{name}_seconds_sum (\S+)", text, re.M)
        c = re.search(rf"^fraudstream_{name}_seconds_count (\S+)", text, re.M)
        if s and c:
            out[f"{name}_s"] = round(float(s.group(1)), 2)
            out[f"{name}_n"] = int(float(c.group(1)))
    # Records read from each input (its topic name's last part: transactions, navigation,
    # repartition) and forwarded through the repartition topic.
    for topic, n in re.findall(r'^fraudstream_messages_consumed_total\{topic="[^"]*-(\w+)"\} (\S+)', text, re.M):
        out[f"consumed_{topic}"] = int(float(n))
    m = re.search(r"^fraudstream_repartitioned_total (\S+)", text, re.M)
    if m:
        out["repartitioned"] = int(float(m.group(1)))
    return out


def plot_timeline(timeline, path):
    """Each phase's latencies over time and its lag (transactions not answered), one panel per
    (title, t0, samples, lag): where a p99 comes from (a start, a stall, a slope)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(timeline), 1, figsize=(9, 3 * len(timeline)), squeeze=False)
    for ax, (title, t0, samples, lag) in zip(axes[:, 0], timeline):
        ax.plot([t - t0 for t, _ in samples], [max(0.1, ms) for _, ms in samples], ",", alpha=0.5)
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms")
        right = ax.twinx()
        right.plot([t for t, _ in lag], [v for _, v in lag], color="tab:red")
        right.set_ylabel("lag, transactions")
        ax.set_title(title)
        ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarise(name, samples, sent, t0, t_end, cpu, broker_cpu, hwm, lag, counted=None):
    """`counted`: the verdicts `cpu` and `broker_cpu` were measured over (default: all)."""
    got = len(samples)
    secs = max(1e-9, t_end - t0)
    per = 100000 / max(1, got if counted is None else counted)
    return {
        "phase": name, "sent": sent, "verdicts": got, "tx_per_s": round(got / secs, 1),
        **latencies(samples),
        "peak_lag": int(max((v for _, v in lag), default=0)),
        "cpu_s_per_100k": round(cpu * per, 2), "broker_cpu_s_per_100k": round(broker_cpu * per, 2),
        "peak_rss_mb": round(hwm / 2**20, 1),
    }


def wait_answered(reader, target, timeout, lag=None, t0=0.0):
    deadline = time.time() + timeout
    while len(reader.samples) < target and time.time() < deadline:
        time.sleep(0.1)
        if lag is not None:
            lag.append((time.time() - t0, target - len(reader.samples)))
    return time.time()


def wait_drained(system, navs, partitions, deadline):
    """Waits until `system` has read all `navs` navigation events from their topic and what it
    forwarded through its repartition topic (up to one transaction marker a partition
    behind); returns the time. A system whose `timing` does not say: at once."""
    while time.time() < deadline:
        t = system.timing()
        if "consumed_navigation" not in t:
            break
        if (t["consumed_navigation"] >= navs
                and t.get("repartitioned", 0) - t.get("consumed_repartition", 0) <= partitions):
            break
        time.sleep(0.25)
    return time.time()


def live(args, scorer, reader, schedule, name):
    """Sends at the rates of `schedule` [(seconds, tx/s)], perf-test processes per step;
    returns the phase's summary and timeline."""
    start = len(reader.samples)
    cpu0, bcpu0 = system_cpu(scorer), proc_cpu(args.broker_pid)
    topic = scorer.topics["transactions"]
    watermarks = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"e2e-lag-{time.time_ns()}"})

    def produced():
        return sum(watermarks.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                   for p in range(args.partitions))

    base = produced()
    t0 = time.time()
    sent, lag = 0, []
    for seconds, rate in schedule:
        tx = perf_test(args, topic, seconds * rate, rate, args.tx_payload)
        nav = perf_test(args, scorer.topics["navigation"], seconds * rate * args.nav_ratio,
                        rate * args.nav_ratio, args.nav_payload)
        while tx.poll() is None:
            time.sleep(0.2)
            # Transactions in the topic and not answered yet.
            lag.append((time.time() - t0, produced() - base - (len(reader.samples) - start)))
        nav.wait()
        sent += int(seconds * rate)
    t_end = wait_answered(reader, start + sent, 300, lag, t0)
    if name.startswith("rate:"):
        t_end = t0 + sum(s for s, _ in schedule)
    cpu, bcpu = system_cpu(scorer) - cpu0, proc_cpu(args.broker_pid) - bcpu0
    watermarks.close()
    r = summarise(name, reader.samples[start:], sent, t0, t_end, cpu, bcpu, system_hwm(scorer), lag)
    # Cumulative over the scorer's life (it serves every live phase).
    r["timing_cumulative"] = scorer_timing(scorer.metrics)
    return r, (name, t0, reader.samples[start:], lag)


def backlog(args, system, name, n, nav_ratio, timeout=900):
    """`n` transactions (and n x nav_ratio navigation events) produced first, as fast as the
    tool can, into the topics of `system` (a Scorer, or anything with its `topics`, `proc`,
    `start`, `stop` and `timing`), then `system` started on them and stopped once it has
    answered them all and read all the navigation (or after `timeout` s): the unthrottled
    throughput, start-up included in `tx_per_s` and left out of `drain_tx_per_s` (first
    verdict to the end of the drain)."""
    producers = [perf_test(args, system.topics["transactions"], n, -1, args.tx_payload)]
    if nav_ratio:
        producers.append(perf_test(args, system.topics["navigation"], n * nav_ratio, -1, args.nav_payload))
    for p in producers:
        last = p.communicate()[0].strip().splitlines()[-1:]
        print(f"perf-test: {' '.join(last)}", file=sys.stderr)
    rd = Reader(args, system.topics["verdicts"], args.partitions)
    rd.start()
    try:
        t0 = time.time()
        system.start()
        # CPU is counted from readiness on (a JVM's start-up is not the work), and so are the
        # transactions it is divided by: a system may answer many before it reports ready
        # (fraudstream with several workers is ready once all have their partitions).
        cpu0, bcpu0 = system_cpu(system), proc_cpu(args.broker_pid)
        before_ready = len(rd.samples)
        t_end = t_last = wait_answered(rd, n, timeout)
        navs = int(n * nav_ratio)
        at_last_verdict = system.timing() if navs else {}
        if navs:
            # Drained once the navigation is read too: a system that answers the purchases
            # before it has read the browsing they came with (Kafka Streams orders its inputs
            # by record timestamp, and the perf tool sends the transactions faster) has not
            # done the work yet, nor spent its CPU on it.
            t_end = wait_drained(system, navs, args.partitions, t0 + timeout)
        cpu_all = system_cpu(system)
        cpu, bcpu = cpu_all - cpu0, proc_cpu(args.broker_pid) - bcpu0
        r = summarise(name, rd.samples, n, t0, t_end, cpu, bcpu, system_hwm(system), [],
                      counted=len(rd.samples) - before_ready)
        r["answered_before_ready"] = before_ready
        # The whole process, start-up and the rebalances before readiness included, over
        # every transaction: steadier between runs than the count from readiness on, which
        # moves with how much was answered before it.
        r["cpu_s_per_100k_all"] = round(cpu_all * 100000 / n, 2)
    finally:
        rd.stopped = True
        rd.join()
        rd.c.close()
    r["timing"] = system.timing()
    r["wall_s"] = round(t_end - t0, 1)
    r["navigation"] = navs
    # Navigation read from its topic by the time the last verdict was read, and how long
    # the rest took (fraudstream's event-time merge holds a purchase for the browsing
    # before it: about 1 and 0 s; Kafka Streams' peer answers the purchases first).
    if navs and "consumed_navigation" in at_last_verdict:
        r["navigation_read_by_last_verdict"] = round(at_last_verdict["consumed_navigation"] / navs, 3)
        # Forwarded records (3 in 4 of the navigation) not read back from the repartition
        # topic yet.
        r["repartition_unread_at_last_verdict"] = (at_last_verdict.get("repartitioned", 0)
                                                   - at_last_verdict.get("consumed_repartition", 0))
        r["drained_after_last_verdict_s"] = round(t_end - t_last, 1)
    r["startup_s"] = round(rd.samples[0][0] - t0, 1) if rd.samples else None
    # From the first verdict to the end of the drain: without the start-up.
    drain = max(1e-9, t_end - rd.samples[0][0]) if rd.samples else 1e-9
    r["drain_tx_per_s"] = round(n / drain, 1)
    r["drain_nav_per_s"] = round(navs / drain, 1)
    for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms", "p99_all_ms", "max_all_ms"):
        r.pop(k)
    system.stop()
    return r


def floor(args):
    """EndToEndLatency: one record produced and consumed at a time, acks=all, 200 bytes."""
    topic = f"e2e-floor-{int(time.time())}"
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result()
    p = kafka_tool("kafka-e2e-latency", args.bootstrap, topic, "5000", "all", "200")
    out, _ = p.communicate(timeout=300)
    figures = {"phase": "floor", "tool": "EndToEndLatency 5000 records, acks=all, 200 B"}
    m = re.search(r"Avg latency: ([\d.]+) ms", out)
    if m:
        figures["avg_ms"] = float(m.group(1))
    m = re.search(r"Percentiles: 50th = (\d+), 99th = (\d+), 99.9th = (\d+)", out)
    if m:
        figures.update(p50_ms=int(m.group(1)), p99_ms=int(m.group(2)), p999_ms=int(m.group(3)))
    return figures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--broker-pid", type=int, required=True)
    ap.add_argument("--payloads", required=True, help="directory of gen_payloads.py's files")
    ap.add_argument("--phases", default="floor,rate:1000,rate:5000,spike:500,backlog:100000")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--guarantee", default="exactly-once", choices=["exactly-once", "at-least-once"])
    ap.add_argument("--workers", type=int, default=1, help="processing.workers of the scorer")
    ap.add_argument("--navigation", action=argparse.BooleanOptionalAction, default=True,
                    help="navigation events beside the transactions (default on)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    args.tx_payload = os.path.join(args.payloads, "transactions.jsonl")
    args.nav_payload = os.path.join(args.payloads, "navigation.jsonl")
    with open(args.tx_payload) as f:
        n_tx = sum(1 for _ in f)
    with open(args.nav_payload) as f:
        n_nav = sum(1 for _ in f)
    args.nav_ratio = n_nav / n_tx if args.navigation else 0

    run = f"e2e-{int(time.time())}"
    results, timeline = [], []
    scorer = reader = None
    for phase in args.phases.split(","):
        kind, _, value = phase.partition(":")
        if kind == "floor":
            r = floor(args)
        elif kind in ("rate", "spike"):
            value = float(value)
            if scorer is None:
                scorer = Scorer(args, run, args.partitions)
                scorer.start()
                reader = Reader(args, scorer.topics["verdicts"], args.partitions)
                reader.start()
            schedule = ([(args.seconds, value)] if kind == "rate"
                        else [(20, value), (30, 10 * value), (60, value)])
            r, line = live(args, scorer, reader, schedule, phase)
            if kind == "spike":
                after = [t for t, v in line[3] if t >= 50 and v <= value]
                r["catch_up_s"] = round(after[0] - 50, 1) if after else None
            timeline.append(line)
        elif kind == "backlog":
            r = backlog(args, Scorer(args, f"{run}-backlog", args.partitions), phase, int(value), args.nav_ratio)
        else:
            sys.exit(f"unknown phase {phase}")
        r["guarantee"] = args.guarantee
        results.append(r)
        print(json.dumps(r), flush=True)
    if scorer is not None:
        reader.stopped = True
        scorer.stop()

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{run}.json"), "w") as f:
        json.dump({"run": run, "partitions": args.partitions, "guarantee": args.guarantee,
                   "navigation_per_tx": round(args.nav_ratio, 2), "results": results}, f, indent=1)
    if timeline:
        plot_timeline([(f"{phase} ({args.guarantee})", t0, samples, lag) for phase, t0, samples, lag in timeline],
                      os.path.join(args.out, f"{run}.png"))
    print(f"{'phase':<16}{'tx/s':>9}{'p50 ms':>9}{'p99':>9}{'p99.9':>9}{'max':>9}{'p99 all':>9}{'lag':>8}"
          f"{'cpu/100k':>10}{'broker':>8}{'rss MB':>8}")
    for r in results:
        print(f"{r['phase']:<16}{str(r.get('tx_per_s', '-')):>9}{str(r.get('p50_ms', '-')):>9}"
              f"{str(r.get('p99_ms', '-')):>9}{str(r.get('p999_ms', '-')):>9}{str(r.get('max_ms', '-')):>9}"
              f"{str(r.get('p99_all_ms', '-')):>9}{str(r.get('peak_lag', '-')):>8}{str(r.get('cpu_s_per_100k', '-')):>10}"
              f"{str(r.get('broker_cpu_s_per_100k', '-')):>8}{str(r.get('peak_rss_mb', '-')):>8}")
    print(f"results: {args.out}/{run}.json, plot: {args.out}/{run}.png")


if __name__ == "__main__":
    main()
