"""End-to-end benchmark: fraudstream (release build) between a producer of transactions and
navigation events (bench/workload.py, about 10 navigation events per purchase) and a reader of
its verdicts, on the broker at --bootstrap. Run by `bench/e2e` (which builds and starts what
is needed); writes bench/results/e2e-<run>.{json,png} and prints a table.

Phases:
- `rate:R`: R transactions/s (and their navigation events) for --seconds, each event stamped
  with the time it is sent; latency = verdict read - transaction event time.
- `spike:B`: B tx/s for 20 s, 10 x B for 30 s ("Black Friday"), B again for 60 s: the peak lag
  (transactions produced and not yet answered) and the time from the end of the spike until
  the lag is back under one second's worth of the base rate.
- `backlog:N`: N transactions with their navigation events produced first to fresh topics,
  then a second fraudstream (its own group) started on them: the time to answer them all is
  the unthrottled throughput, transactions and navigation events applied per second.

Per phase: achieved transactions/s, latency p50/p99/p99.9/max, peak lag, and the scorer's CPU
seconds per 100k transactions (utime + stime from /proc) and its peak resident memory (VmHWM).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import Shop, encode  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def pct(sorted_values, p):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def proc_stats(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return cpu, hwm


class Scorer:
    """A fraudstream process on its own topics and group."""

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
        env = dict(os.environ,
                   FRAUDSTREAM__BROKERS=self.args.bootstrap, FRAUDSTREAM__GROUP_ID=self.run,
                   FRAUDSTREAM__TOPICS__TRANSACTIONS=self.topics["transactions"],
                   FRAUDSTREAM__TOPICS__NAVIGATION=self.topics["navigation"],
                   FRAUDSTREAM__TOPICS__VERDICTS=self.topics["verdicts"],
                   FRAUDSTREAM__TOPICS__DEAD_LETTER=self.topics["dlq"],
                   FRAUDSTREAM__TOPICS__LABELS=self.topics["labels"],
                   FRAUDSTREAM__TOPICS__BLOCKLIST=self.topics["blocklist"],
                   FRAUDSTREAM__METRICS__LISTEN=self.metrics,
                   FRAUDSTREAM__STATE__PATH=f"/tmp/{self.run}-state", RUST_LOG="warn")
        self.log = open(f"/tmp/{self.run}.log", "w")
        self.proc = subprocess.Popen([self.args.bin, "run", "--config", "docs/fraudstream.toml"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 120
        while time.time() < deadline:
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


class Reader(threading.Thread):
    """Reads verdicts; a transaction id carries its send time in ms (`b<ms>-<n>`)."""

    def __init__(self, args, topic, partitions):
        super().__init__(daemon=True)
        self.c = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"e2e-reader-{time.time_ns()}",
                           "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self.c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        self.samples = []  # (read time s, latency ms, event time ms)
        self.seen = set()
        self.stopped = False

    def run(self):
        while not self.stopped:
            for m in self.c.consume(1000, 0.05):
                if m.error():
                    continue
                k = m.key()
                if k in self.seen:
                    continue
                self.seen.add(k)
                now = time.time()
                sent = int(k[1:k.index(b"-")])
                self.samples.append((now, now * 1000 - sent, sent))


def stamped(events, now_ms, n):
    """A purchase's events, the last one at `now_ms`; each transaction id carries the send
    time (`b<now_ms>-...`), from which the reader measures latency."""
    out = []
    end = max(e[2]["event_time"] for e in events)
    for kind, key, ev in events:
        ev = dict(ev)
        ev["event_time"] = now_ms - (end - ev["event_time"])
        if kind == "tx":
            ev["transaction_id"] = f"b{now_ms}-{n}-{ev['transaction_id']}"
        out.append((kind, key, encode(ev)))
    return out


def produce(producer, scorer, shop, schedule, reader, start, sample_every=0.1):
    """Sends purchases at the rate `schedule(t)` (tx/s at t seconds into the phase) until it
    returns None; returns (transactions sent, lag samples [(t, in flight)])."""
    t0 = time.time()
    sent, due, lag = 0, 0.0, []
    last_sample = last = 0.0
    n = 0
    while True:
        t = time.time() - t0
        rate = schedule(t)
        if rate is None:
            break
        due += rate * (t - last)
        last = t
        while sent < due:
            n += 1
            for kind, key, value in stamped(shop.purchase(0), int(time.time() * 1000), n):
                topic = scorer.topics["transactions" if kind == "tx" else "navigation"]
                while True:
                    try:
                        producer.produce(topic, key=key, value=value)
                        break
                    except BufferError:
                        producer.poll(0.001)
                if kind == "tx":
                    sent += 1
        producer.poll(0)
        if t - last_sample >= sample_every:
            lag.append((t, sent - (len(reader.samples) - start)))
            last_sample = t
        time.sleep(max(0.0, 0.005 - (time.time() - t0 - t)))
    producer.flush(30)
    return sent, lag, t0


def summarise(name, reader, start_index, sent, t0, t_end, cpu, hwm, lag):
    lat = sorted(s[1] for s in reader.samples[start_index:])
    got = len(reader.samples) - start_index
    secs = max(1e-9, t_end - t0)
    return {
        "phase": name, "sent": sent, "verdicts": got, "tx_per_s": round(got / secs, 1),
        "p50_ms": round(pct(lat, 0.5), 1), "p99_ms": round(pct(lat, 0.99), 1),
        "p999_ms": round(pct(lat, 0.999), 1), "max_ms": round(lat[-1], 1) if lat else None,
        "peak_lag": max((l for _, l in lag), default=0),
        "cpu_s_per_100k": round(cpu / max(1, got) * 100000, 2), "peak_rss_mb": round(hwm / 2**20, 1),
    }


def wait_answered(reader, target, timeout, lag=None, t0=0.0):
    """Waits until `target` verdicts have been read; with `lag`, goes on sampling it."""
    deadline = time.time() + timeout
    while len(reader.samples) < target and time.time() < deadline:
        time.sleep(0.1)
        if lag is not None:
            lag.append((time.time() - t0, target - len(reader.samples)))
    return time.time()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--phases", default="rate:1000,rate:5000,spike:500,backlog:100000")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    run = f"e2e-{int(time.time())}"
    shop = Shop(seed=7)
    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 5,
                         "partitioner": "murmur2_random", "queue.buffering.max.messages": 1000000})
    results, timeline = [], []
    live = None
    for phase in args.phases.split(","):
        kind, value = phase.split(":")
        value = float(value)
        if kind in ("rate", "spike"):
            if live is None:
                live = Scorer(args, run, args.partitions)
                live.start()
                live_reader = Reader(args, live.topics["verdicts"], args.partitions)
                live_reader.start()
                time.sleep(2)
            start = len(live_reader.samples)
            cpu0, _ = proc_stats(live.proc.pid)
            if kind == "rate":
                sched = (lambda t, r=value: r if t < args.seconds else None)
            else:
                sched = (lambda t, b=value: b if t < 20 else 10 * b if t < 50 else b if t < 110 else None)
            sent, lag, t0 = produce(producer, live, shop, sched, live_reader, start)
            # Everything answered (or 60 s more), then CPU and memory of the phase.
            t_end = wait_answered(live_reader, start + sent, 300, lag, t0)
            if kind == "rate":
                t_end = t0 + args.seconds
            cpu1, hwm = proc_stats(live.proc.pid)
            r = summarise(phase, live_reader, start, sent, t0, t_end, cpu1 - cpu0, hwm, lag)
            if kind == "spike":
                base = value
                after = [t for t, l in lag if t >= 50 and l <= base]
                r["catch_up_s"] = round(after[0] - 50, 1) if after else None
            timeline.append((phase, t0, live_reader.samples[start:], lag))
        elif kind == "backlog":
            n = int(value)
            b = Scorer(args, f"{run}-backlog", args.partitions)
            sent = navs = 0
            now = int(time.time() * 1000)
            i = 0
            while sent < n:
                i += 1
                for k, key, v in stamped(shop.purchase(0), now + i // 10, i):
                    producer.produce(b.topics["transactions" if k == "tx" else "navigation"], key=key, value=v)
                    sent += k == "tx"
                    navs += k == "nav"
                    producer.poll(0)
            producer.flush(120)
            reader = Reader(args, b.topics["verdicts"], args.partitions)
            reader.start()
            t0 = time.time()
            b.start()
            cpu0, _ = proc_stats(b.proc.pid)
            t_end = wait_answered(reader, sent, 600)
            cpu1, hwm = proc_stats(b.proc.pid)
            r = summarise(phase, reader, 0, sent, t0, t_end, cpu1 - cpu0, hwm, [])
            r["navigation"] = navs
            r["nav_per_s"] = round(navs / max(1e-9, t_end - t0), 1)
            r["startup_s"] = round(reader.samples[0][0] - t0, 1) if reader.samples else None
            # From the first verdict to the last: the drain without the start-up.
            drain = max(1e-9, reader.samples[-1][0] - reader.samples[0][0]) if reader.samples else 1e-9
            r["drain_tx_per_s"] = round(sent / drain, 1)
            r["drain_nav_per_s"] = round(navs / drain, 1)
            r["note"] = "tx_per_s and nav_per_s include the start-up; drain_* do not"
            r.pop("p50_ms"), r.pop("p99_ms"), r.pop("p999_ms"), r.pop("max_ms")
            reader.stopped = True
            b.stop()
        else:
            sys.exit(f"unknown phase {phase}")
        results.append(r)
        print(json.dumps(r), flush=True)
    if live is not None:
        live_reader.stopped = True
        live.stop()

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{run}.json"), "w") as f:
        json.dump({"run": run, "partitions": args.partitions, "results": results}, f, indent=1)
    if timeline:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(len(timeline), 1, figsize=(9, 3 * len(timeline)), squeeze=False)
        for ax, (phase, t0, samples, lag) in zip(axes[:, 0], timeline):
            ax.plot([s[0] - t0 for s in samples], [s[1] for s in samples], ",", alpha=0.5, label="latency (ms)")
            ax.set_yscale("log")
            ax.set_ylabel("latency, ms")
            ax2 = ax.twinx()
            ax2.plot([t for t, _ in lag], [l for _, l in lag], color="tab:red", label="lag (tx)")
            ax2.set_ylabel("lag, transactions")
            ax.set_title(phase)
            ax.set_xlabel("seconds")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"{run}.png"), dpi=90)
    print(f"{'phase':<16}{'tx/s':>9}{'p50 ms':>10}{'p99':>10}{'p99.9':>10}{'max':>10}{'lag':>8}{'cpu/100k':>10}{'rss MB':>8}")
    for r in results:
        print(f"{r['phase']:<16}{r['tx_per_s']:>9}{str(r.get('p50_ms', '-')):>10}{str(r.get('p99_ms', '-')):>10}"
              f"{str(r.get('p999_ms', '-')):>10}{str(r.get('max_ms', '-')):>10}{r['peak_lag']:>8}"
              f"{r['cpu_s_per_100k']:>10}{r['peak_rss_mb']:>8}")
    print(f"results: {args.out}/{run}.json, plot: {args.out}/{run}.png")


if __name__ == "__main__":
    main()
