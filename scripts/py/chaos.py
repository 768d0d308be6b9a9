"""The chaos run (docs/RELIABILITY.md): a stream of transactions with navigation events is
scored twice, once by a single fraudstream instance (clean) and once by instances that are
SIGKILLed at random moments (--kills) and that join and leave (--rebalances) (chaos). Checks: every transaction has a verdict,
duplicate verdicts are identical, every chaos verdict equals the clean one, and the final
per-entity state (`fraudstream state-export` of each run's changelog) is equal.

    python scripts/py/chaos.py --bin target/release/fraudstream [--transactions 1000000]
        [--kills 5] [--rebalances 5] [--seed 1]

Run by `scripts/chaos` (long variant) and by the integration test `chaos::short_chaos_run`.
Prints a JSON summary; exits 1 if a check fails.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import socket

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

T0 = 1_795_341_600_000


def log(msg):
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    def __init__(self, args, group, topics, name, work):
        self.args, self.group, self.topics, self.name = args, group, topics, name
        self.state = os.path.join(work, f"{group}-{name}-state")
        self.logpath = os.path.join(work, f"{group}-{name}.log")
        self.proc = None

    def env(self):
        t = self.topics
        return dict(os.environ,
                    FRAUDSTREAM__BROKERS=self.args.bootstrap, FRAUDSTREAM__GROUP_ID=self.group,
                    FRAUDSTREAM__TOPICS__TRANSACTIONS=t["tx"], FRAUDSTREAM__TOPICS__NAVIGATION=t["nav"],
                    FRAUDSTREAM__TOPICS__VERDICTS=t["verdicts"], FRAUDSTREAM__TOPICS__DEAD_LETTER=t["dlq"],
                    FRAUDSTREAM__TOPICS__LABELS=t["labels"], FRAUDSTREAM__TOPICS__BLOCKLIST=t["blocklist"],
                    FRAUDSTREAM__METRICS__LISTEN=f"127.0.0.1:{free_port()}",
                    FRAUDSTREAM__STATE__PATH=self.state,
                    # Both runs merge the inputs in the same (event-time) order: wait, never guess.
                    FRAUDSTREAM__BATCH__MAX_TASK_IDLE_MS="60000",
                    FRAUDSTREAM__BATCH__MAX_RECORDS=str(self.args.batch),
                    FRAUDSTREAM__KAFKA_CONSUMER__SESSION_TIMEOUT_MS="6000",
                    FRAUDSTREAM__KAFKA_CONSUMER__HEARTBEAT_INTERVAL_MS="1000",
                    RUST_LOG="info")

    def start(self):
        self.proc = subprocess.Popen([self.args.bin, "run", "--config", "docs/fraudstream.toml"],
                                     env=self.env(), stdout=subprocess.DEVNULL,
                                     stderr=open(self.logpath, "a"))

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        if code != 0:
            raise SystemExit(f"{self.name} exited with {code} after SIGTERM; log {self.logpath}")


def create_topics(args, names):
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    fs = admin.create_topics([NewTopic(n, p, 1) for n, p in names])
    for f in fs.values():
        f.result()


def produce_input(args, topics):
    """N transactions and N navigation events (a page view 50 ms before each purchase, in
    the purchase's session), keyed by customer."""
    p = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 20, "partitioner": "murmur2_random",
                  "queue.buffering.max.messages": 1_000_000})
    n = args.transactions
    customers = max(50, n // 50)
    for kind in ("nav", "tx"):
        for i in range(n):
            c = f"c{i % customers}"
            s = f"s{i // (customers * 10)}"
            t = T0 + i * 100
            if kind == "nav":
                v = (f'{{"event_id":"n{i}","event_time":{t - 50},"customer_id":"{c}","session_id":"{s}",'
                     f'"kind":"page_view","device_id":"d{i % 7}"}}')
            else:
                v = (f'{{"transaction_id":"t{i}","event_time":{t},"customer_id":"{c}","merchant_id":"m{i % 97}",'
                     f'"amount":{5 + (i * 7919) % 500}.25,"currency":"USD","session_id":"{s}","device_id":"d{i % 7}",'
                     f'"customer_lat":40.1,"customer_lon":-75.2,"merchant_lat":40.3,"merchant_lon":-75.0,'
                     f'"customer_birth_date":"1980-01-01","customer_city_pop":50000}}')
            while True:
                try:
                    p.produce(topics[kind], key=c, value=v)
                    break
                except BufferError:
                    p.poll(0.01)
            if i % 10000 == 0:
                p.poll(0)
    p.flush(120)


class Verdicts:
    def __init__(self, args, topic, partitions):
        self.c = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"chaos-reader-{time.time_ns()}",
                           "enable.auto.commit": False, "fetch.wait.max.ms": 50})
        self.c.assign([TopicPartition(topic, q, OFFSET_BEGINNING) for q in range(partitions)])
        self.by_id = {}
        self.total = 0

    def poll(self, seconds):
        end = time.time() + seconds
        while time.time() < end:
            for m in self.c.consume(5000, 0.1):
                if m.error():
                    continue
                v = json.loads(m.value())
                self.total += 1
                self.by_id.setdefault(v["transaction_id"], []).append(
                    (v["score"], v["decision"], v["model_version"], tuple(r["code"] for r in v["reasons"])))


def compare(clean, clean_state, other, other_state):
    """The checks of a disturbed run against the clean one, as summary fields, and whether
    they all pass: every transaction answered, duplicates identical, verdicts and state equal."""
    missing = sum(1 for t in clean.by_id if t not in other.by_id)
    fields = {
        "verdicts": other.total, "duplicates": other.total - len(other.by_id),
        "transactions_without_verdict": missing,
        "differing_duplicates": sum(1 for v in other.by_id.values() if len(set(v)) > 1),
        "verdicts_differing_from_clean": sum(
            1 for t, v in other.by_id.items() if t in clean.by_id and v[0] != clean.by_id[t][0]),
        "state_entities": len(clean_state),
        "state_lines_differing": len(set(clean_state) ^ set(other_state)),
    }
    ok = (missing == 0 and fields["differing_duplicates"] == 0 and fields["verdicts_differing_from_clean"] == 0
          and fields["state_lines_differing"] == 0 and len(clean_state) > 0)
    return fields, ok


def export(args, instance, path):
    out = subprocess.run([args.bin, "state-export", "--config", "docs/fraudstream.toml", "--output", path],
                         env=instance.env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"state-export failed: {out.stderr}")
    with open(path) as f:
        return f.read().splitlines()


def run(args, work, run_id, name, topics_in, chaos):
    group = f"{run_id}-{name}"
    topics = dict(topics_in, verdicts=f"{group}-verdicts", dlq=f"{group}-dlq")
    create_topics(args, [(topics["verdicts"], args.partitions), (topics["dlq"], 1)])
    n = args.transactions
    reader = Verdicts(args, topics["verdicts"], args.partitions)
    pool = [Instance(args, group, topics, f"i{k}", work) for k in range(3)]
    rng = random.Random(args.seed)
    counts = {"kills": 0, "joins": 0, "leaves": 0}
    pool[0].start()
    if chaos:
        pool[1].start()
    t0 = time.time()
    # The disturbances, spread over the stream: the j-th happens once that share of the
    # transactions is answered (and at least 1.5 s after the previous one).
    plan = []
    if chaos:
        plan = ["kill"] * args.kills + ["move"] * args.rebalances
        rng.shuffle(plan)
    marks = [int(n * (0.05 + 0.85 * j / max(1, len(plan)))) for j in range(len(plan))]
    last_action = 0.0
    deadline = time.time() + args.timeout
    while len(reader.by_id) < n:
        reader.poll(0.2)
        if time.time() > deadline:
            raise SystemExit(f"{name}: only {len(reader.by_id)} of {n} verdicts after {args.timeout} s")
        if not plan or len(reader.by_id) < marks[0] or time.time() - last_action < 1.5:
            continue
        action = plan.pop(0)
        marks.pop(0)
        last_action = time.time()
        running = [i for i in pool if i.running()]
        stopped = [i for i in pool if not i.running()]
        if action == "kill":
            victim = rng.choice(running)
            victim.kill()
            counts["kills"] += 1
            log(f"{name}: SIGKILL {victim.name} at {len(reader.by_id)} verdicts; restarting it")
            victim.start()
        elif stopped and (len(running) < 2 or rng.random() < 0.5):
            joiner = rng.choice(stopped)
            joiner.start()
            counts["joins"] += 1
            log(f"{name}: {joiner.name} joins at {len(reader.by_id)} verdicts")
        else:
            leaver = rng.choice(running)
            leaver.stop()
            counts["leaves"] += 1
            log(f"{name}: {leaver.name} leaves (SIGTERM) at {len(reader.by_id)} verdicts")
    if plan:
        log(f"{name}: the stream ended with {len(plan)} disturbances not done (use more transactions)")
    elapsed = time.time() - t0
    reader.poll(2)
    for i in pool:
        if i.running():
            i.stop()
    state = export(args, pool[0], os.path.join(work, f"{group}.state"))
    log(f"{name}: {n} transactions answered in {elapsed:.0f} s; {len(state)} entities in the changelog")
    return reader, state, counts, elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--transactions", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--rebalances", type=int, default=5, help="joins and leaves (each a rebalance), besides the kills")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()

    run_id = f"chaos-{os.getpid()}-{int(time.time())}"
    work = tempfile.mkdtemp(prefix="fraudstream-chaos-")
    topics = {"tx": f"{run_id}-tx", "nav": f"{run_id}-nav", "labels": f"{run_id}-labels",
              "blocklist": f"{run_id}-blocklist"}
    create_topics(args, [(topics["tx"], args.partitions), (topics["nav"], args.partitions),
                         (topics["labels"], 1), (topics["blocklist"], 1)])
    log(f"producing {args.transactions} transactions and as many navigation events")
    produce_input(args, topics)

    clean, clean_state, _, clean_s = run(args, work, run_id, "clean", topics, chaos=False)
    chaos, chaos_state, counts, chaos_s = run(args, work, run_id, "chaos", topics, chaos=True)

    fields, ok = compare(clean, clean_state, chaos, chaos_state)
    summary = {
        "transactions": args.transactions, "navigation_events": args.transactions,
        "kills": counts["kills"], "joins": counts["joins"], "leaves": counts["leaves"],
        "joins_and_leaves": counts["joins"] + counts["leaves"],
        "rebalances": counts["kills"] + counts["joins"] + counts["leaves"],
        **fields,
        "clean_seconds": round(clean_s, 1), "chaos_seconds": round(chaos_s, 1), "work": work,
    }
    print(json.dumps(summary, indent=1))
    if not ok or counts["kills"] < args.kills or summary["joins_and_leaves"] < args.rebalances:
        log("FAILED")
        sys.exit(1)
    log("passed")


if __name__ == "__main__":
    main()
