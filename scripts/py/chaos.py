"""The chaos run (docs/RELIABILITY.md). A stream of transactions, keyed three ways, with
navigation events, is scored twice on an Apache Kafka broker of the run's own: once by a single
fraudstream instance (clean), once by up to three instances (chaos) that are SIGKILLed at
random moments (--kills; some of them inside a commit, by the FRAUDSTREAM_TEST_CRASH hook),
that join and leave (--rebalances), while the broker itself is SIGKILLed and restarted on its
log directory (--broker-kills).

Checks, with a read_committed reader of the verdicts: every transaction has a verdict; under
exactly-once, exactly one; under at-least-once, duplicates are identical; every verdict's
score, decision, reasons and audit features equal the clean run's; and the final state
(`fraudstream state-export` of each run's changelog) is equal line for line.

The input, per customer: a third keyed by customer on murmur2's partition (with a page view
before each purchase), a third keyed but written to another partition (as a CRC32 producer
would), a third unkeyed; the last two go through the repartition topic. Their merchants are
their own, and each repartition partition is fed by one source partition, so the order in
which each entity sees its events is the same in every run, which is what lets verdicts be
compared exactly.

    python scripts/py/chaos.py --bin target/release/fraudstream [--transactions 1000000]
        [--guarantee exactly-once|at-least-once] [--kills 5] [--rebalances 5]
        [--broker-kills 1] [--seed 1]

Run by `scripts/chaos` (long variant) and by the integration tests in tests/chaos.rs.
Prints a JSON summary; exits 1 if a check fails.
"""

import argparse
import hashlib
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

T0 = 1_795_341_600_000
BROKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "broker")
CRASH_POINTS = ["before-offsets", "before-commit", "before-store"]


def log(msg):
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port(span=1):
    """A port p such that p .. p+span-1 are all free now."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span > 65535:
            continue
        free = True
        for q in range(port + 1, port + span):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    free = False
        if free:
            return port


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's partitioner)."""
    m, r = 0x5BD1E995, 24
    h = (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    n4 = len(data) // 4 * 4
    for i in range(0, n4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = data[n4:]
    if len(rest) >= 3:
        h ^= rest[2] << 16
    if len(rest) >= 2:
        h ^= rest[1] << 8
    if rest:
        h ^= rest[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def home(customer, partitions):
    return (murmur2(customer.encode()) & 0x7FFFFFFF) % partitions


class Broker:
    """An Apache Kafka broker of the run's own (scripts/broker): SIGKILL, then back on the
    same log directory."""

    def __init__(self, work):
        self.port = free_port(span=2)  # the controller listens on port + 1
        self.url = f"127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port), "--dir", os.path.join(work, "broker")]
        self.started = False

    def start(self):
        keep = ["--keep"] if self.started else []
        subprocess.run([BROKER, "start", *self.args, *keep], check=True, stdout=sys.stderr)
        self.started = True

    def kill(self):
        subprocess.run([BROKER, "kill", *self.args], check=True, stdout=sys.stderr)

    def stop(self):
        subprocess.run([BROKER, "stop", *self.args], check=False, stdout=sys.stderr)


class Instance:
    def __init__(self, args, group, topics, name, work, workers=1):
        self.args, self.group, self.topics, self.name = args, group, topics, name
        self.workers = workers
        self.state = os.path.join(work, f"{group}-{name}-state")
        self.logpath = os.path.join(work, f"{group}-{name}.log")
        self.proc = None

    def env(self, crash=None):
        t = self.topics
        env = dict(os.environ,
                   FRAUDSTREAM__BROKERS=self.args.bootstrap, FRAUDSTREAM__GROUP_ID=self.group,
                   FRAUDSTREAM__TOPICS__TRANSACTIONS=t["tx"], FRAUDSTREAM__TOPICS__NAVIGATION=t["nav"],
                   FRAUDSTREAM__TOPICS__VERDICTS=t["verdicts"], FRAUDSTREAM__TOPICS__DEAD_LETTER=t["dlq"],
                   FRAUDSTREAM__TOPICS__LABELS=t["labels"], FRAUDSTREAM__TOPICS__BLOCKLIST=t["blocklist"],
                   FRAUDSTREAM__METRICS__LISTEN=f"127.0.0.1:{free_port()}",
                   FRAUDSTREAM__STATE__PATH=self.state,
                   FRAUDSTREAM__STATE__HMAC_SECRET=self.args.hmac_secret,
                   FRAUDSTREAM__PROCESSING__GUARANTEE=self.args.guarantee,
                   FRAUDSTREAM__PROCESSING__WORKERS=str(self.workers),
                   FRAUDSTREAM__OUTPUT__AUDIT_FEATURES="true",
                   # Both runs merge the inputs in the same (event-time) order: wait, never guess.
                   FRAUDSTREAM__BATCH__MAX_FETCH_WAIT_MS="60000",
                   FRAUDSTREAM__BATCH__MAX_RECORDS=str(self.args.batch),
                   FRAUDSTREAM__KAFKA_CONSUMER__SESSION_TIMEOUT_MS="6000",
                   FRAUDSTREAM__KAFKA_CONSUMER__HEARTBEAT_INTERVAL_MS="1000",
                   RUST_LOG="info")
        env.pop("FRAUDSTREAM_TEST_CRASH", None)
        if crash:
            env["FRAUDSTREAM_TEST_CRASH"] = crash
        return env

    def start(self, crash=None):
        # No core file from the hook's abort: the process must be gone at once, as killed.
        self.proc = subprocess.Popen([self.args.bin, "run", "--config", "docs/fraudstream.toml"],
                                     env=self.env(crash), stdout=subprocess.DEVNULL,
                                     stderr=open(self.logpath, "a"),
                                     preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))

    def crashed(self):
        """Aborted by the commit hook (and not restarted yet)."""
        return self.crashing and self.proc is not None and self.proc.poll() not in (0, None)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(90)
        if code != 0:
            raise SystemExit(f"{self.name} exited with {code} after SIGTERM; log {self.logpath}")


def create_topics(args, names):
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    fs = admin.create_topics([NewTopic(n, p, 1) for n, p in names])
    for f in fs.values():
        f.result()


def produce_input(args, topics):
    """N transactions, and a page view 50 ms before each purchase of a keyed customer."""
    # Idempotent: a retried batch is neither written twice (a transaction with two verdicts)
    # nor behind later ones.
    p = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 20, "partitioner": "murmur2_random",
                  "queue.buffering.max.messages": 1_000_000, "enable.idempotence": True})
    n, parts = args.transactions, args.partitions
    customers = max(60, n // 50)
    homes = [home(f"c{k}", parts) for k in range(customers)]

    def send(topic, key, value, partition=None):
        while True:
            try:
                if partition is None:
                    p.produce(topic, key=key, value=value)
                else:
                    p.produce(topic, key=key, value=value, partition=partition)
                return
            except BufferError:
                p.poll(0.01)

    for i in range(n):
        k = i % customers
        c = f"c{k}"
        kind = k % 3  # 0 keyed, 1 keyed on another partition, 2 unkeyed
        s = f"s{i // (customers * 10)}"
        t = T0 + i * 100
        if kind == 0:
            send(topics["nav"], c, f'{{"event_id":"n{i}","event_time":{t - 50},"customer_id":"{c}",'
                                   f'"session_id":"{s}","kind":"page_view","device_id":"d{i % 7}"}}')
        merchant = f"m{i % 97}" if kind == 0 else f"x{i % 31}"
        v = (f'{{"transaction_id":"t{i}","event_time":{t},"customer_id":"{c}","merchant_id":"{merchant}",'
             f'"amount":{5 + (i * 7919) % 500}.25,"currency":"USD","session_id":"{s}","device_id":"d{i % 7}",'
             f'"customer_lat":40.1,"customer_lon":-75.2,"merchant_lat":40.3,"merchant_lon":-75.0,'
             f'"customer_birth_date":"1980-01-01","customer_city_pop":50000}}')
        if kind == 0:
            send(topics["tx"], c, v)
        else:
            # One source partition feeds each repartition partition: 0, or 1 for customers of 0.
            wrong = 1 if homes[k] == 0 else 0
            send(topics["tx"], c if kind == 1 else None, v, partition=wrong)
        if i % 10000 == 0:
            p.poll(0)
    p.flush(120)


class Verdicts:
    """A read_committed reader of the verdicts (librdkafka's default isolation level)."""

    def __init__(self, args, topic, partitions):
        self.c = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"chaos-reader-{time.time_ns()}",
                           "enable.auto.commit": False, "isolation.level": "read_committed"})
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
                features = hashlib.blake2b(json.dumps(v.get("features"), sort_keys=True).encode(),
                                           digest_size=12).digest()
                self.by_id.setdefault(v["transaction_id"], []).append(
                    (v["score"], v["decision"], v["model_version"], tuple(r["code"] for r in v["reasons"]),
                     features))


def compare(args, clean, clean_state, other, other_state):
    """The checks of a disturbed run against the clean one, as summary fields, and whether
    they all pass."""
    missing = sum(1 for t in clean.by_id if t not in other.by_id)
    duplicates = other.total - len(other.by_id)
    fields = {
        "verdicts": other.total, "duplicates": duplicates,
        "transactions_without_verdict": missing,
        "differing_duplicates": sum(1 for v in other.by_id.values() if len(set(v)) > 1),
        "verdicts_differing_from_clean": sum(
            1 for t, v in other.by_id.items() if t in clean.by_id and v[0] != clean.by_id[t][0]),
        "state_entities": len(clean_state),
        "state_lines_differing": len(set(clean_state) ^ set(other_state)),
    }
    ok = (missing == 0 and fields["differing_duplicates"] == 0 and fields["verdicts_differing_from_clean"] == 0
          and fields["state_lines_differing"] == 0 and len(clean_state) > 0
          and len(clean.by_id) == args.transactions)
    if args.guarantee == "exactly-once":
        ok = ok and duplicates == 0 and clean.total == args.transactions
    return fields, ok


def export(args, instance, path):
    out = subprocess.run([args.bin, "state-export", "--config", "docs/fraudstream.toml", "--output", path],
                         env=instance.env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"state-export failed: {out.stderr}")
    with open(path) as f:
        return f.read().splitlines()


def run(args, work, run_id, name, topics_in, broker, chaos):
    group = f"{run_id}-{name}"
    topics = dict(topics_in, verdicts=f"{group}-verdicts", dlq=f"{group}-dlq")
    create_topics(args, [(topics["verdicts"], args.partitions), (topics["dlq"], 1)])
    n = args.transactions
    reader = Verdicts(args, topics["verdicts"], args.partitions)
    # The clean run has one worker: the chaos run's (--workers) must come to the same.
    workers = args.workers if chaos else 1
    pool = [Instance(args, group, topics, f"i{k}", work, workers) for k in range(3)]
    rng = random.Random(args.seed)
    counts = {"kills": 0, "kills_in_commit": 0, "joins": 0, "leaves": 0, "broker_kills": 0}
    pool[0].start()
    if chaos:
        pool[1].start()
    t0 = time.time()
    # The disturbances, spread over the stream: the j-th happens once that share of the
    # transactions is answered (and at least 2 s after the previous one).
    plan = []
    if chaos:
        plan = ["kill"] * args.kills + ["move"] * args.rebalances + ["broker"] * args.broker_kills
        rng.shuffle(plan)
    marks = [int(n * (0.05 + 0.85 * j / max(1, len(plan)))) for j in range(len(plan))]
    last_action = 0.0
    deadline = time.time() + args.timeout
    while len(reader.by_id) < n:
        reader.poll(0.2)
        if time.time() > deadline:
            raise SystemExit(f"{name}: only {len(reader.by_id)} of {n} verdicts after {args.timeout} s")
        restart_crashed(name, pool, counts)
        if not plan or len(reader.by_id) < marks[0] or time.time() - last_action < 2:
            continue
        action = plan.pop(0)
        marks.pop(0)
        last_action = time.time()
        running = [i for i in pool if i.running()]
        stopped = [i for i in pool if not i.running()]
        if action == "kill":
            # Not one that is set to abort inside a commit: let it.
            victim = rng.choice([i for i in running if not i.crashing] or running)
            victim.kill()
            if counts["kills"] % 2 == 1:
                # Killed again by itself, inside one of its next commits.
                point = rng.choice(CRASH_POINTS)
                victim.crashing = f"{point}:{rng.randint(1, 3)}"
                log(f"{name}: SIGKILL {victim.name} at {len(reader.by_id)} verdicts; restarting it to crash at {victim.crashing}")
                victim.start(crash=victim.crashing)
            else:
                victim.crashing = None
                log(f"{name}: SIGKILL {victim.name} at {len(reader.by_id)} verdicts; restarting it")
                victim.start()
            counts["kills"] += 1
        elif action == "broker":
            log(f"{name}: SIGKILL the broker at {len(reader.by_id)} verdicts; back in {args.broker_down} s")
            broker.kill()
            time.sleep(args.broker_down)
            broker.start()
            counts["broker_kills"] += 1
        elif stopped and (len(running) < 2 or rng.random() < 0.5):
            joiner = rng.choice(stopped)
            joiner.start()
            counts["joins"] += 1
            log(f"{name}: {joiner.name} joins at {len(reader.by_id)} verdicts")
        else:
            leaver = rng.choice([i for i in running if not i.crashing] or running)
            leaver.stop()
            counts["leaves"] += 1
            log(f"{name}: {leaver.name} leaves (SIGTERM) at {len(reader.by_id)} verdicts")
    if plan:
        log(f"{name}: the stream ended with {len(plan)} disturbances not done (use more transactions)")
    elapsed = time.time() - t0
    # Every verdict seen is not every state change committed (at-least-once shows verdicts
    # before their commit): with crashed instances back, wait until the stream is quiet
    # for longer than a session timeout and a restore.
    quiet_since, last_total = time.time(), reader.total
    while time.time() - quiet_since < 10:
        if restart_crashed(name, pool, counts):
            quiet_since = time.time()
        reader.poll(0.5)
        if reader.total != last_total:
            quiet_since, last_total = time.time(), reader.total
        if time.time() > deadline:
            raise SystemExit(f"{name}: verdicts still coming after {args.timeout} s")
    for i in pool:
        if i.running():
            i.stop()
    state = export(args, pool[0], os.path.join(work, f"{group}.state"))
    log(f"{name}: {n} transactions answered in {elapsed:.0f} s; {len(state)} state records in the changelog")
    return reader, state, counts, elapsed


Instance.crashing = None


def restart_crashed(name, pool, counts):
    """An instance that aborted inside a commit (the hook) comes back, as under a supervisor."""
    restarted = False
    for i in pool:
        if i.crashed():
            log(f"{name}: {i.name} aborted inside commit ({i.crashing}); restarting it")
            i.crashing = None
            counts["kills"] += 1
            counts["kills_in_commit"] += 1
            i.start()
            restarted = True
    return restarted


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--guarantee", default="exactly-once", choices=["exactly-once", "at-least-once"])
    ap.add_argument("--transactions", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--rebalances", type=int, default=5, help="joins and leaves (each a rebalance), besides the kills")
    ap.add_argument("--broker-kills", type=int, default=1)
    ap.add_argument("--broker-down", type=float, default=3.0, help="seconds the broker stays down")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--workers", type=int, default=1, help="processing.workers of each instance in the chaos run")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()

    run_id = f"chaos-{os.getpid()}-{int(time.time())}"
    args.hmac_secret = os.urandom(16).hex()
    work = tempfile.mkdtemp(prefix="fraudstream-chaos-")
    broker = Broker(work)
    broker.start()
    args.bootstrap = broker.url
    try:
        topics = {"tx": f"{run_id}-tx", "nav": f"{run_id}-nav", "labels": f"{run_id}-labels",
                  "blocklist": f"{run_id}-blocklist"}
        create_topics(args, [(topics["tx"], args.partitions), (topics["nav"], args.partitions),
                             (topics["labels"], 1), (topics["blocklist"], 1)])
        log(f"producing {args.transactions} transactions (keyed, keyed elsewhere, unkeyed) with navigation")
        produce_input(args, topics)
        clean, clean_state, _, clean_s = run(args, work, run_id, "clean", topics, broker, chaos=False)
        chaos, chaos_state, counts, chaos_s = run(args, work, run_id, "chaos", topics, broker, chaos=True)
    finally:
        broker.stop()

    fields, ok = compare(args, clean, clean_state, chaos, chaos_state)
    summary = {
        "guarantee": args.guarantee, "workers": args.workers, "transactions": args.transactions,
        "navigation_events": (args.transactions + 2) // 3, **counts,
        "joins_and_leaves": counts["joins"] + counts["leaves"],
        **fields,
        "clean_seconds": round(clean_s, 1), "chaos_seconds": round(chaos_s, 1), "work": work,
    }
    print(json.dumps(summary, indent=1))
    if (not ok or counts["kills"] < args.kills or summary["joins_and_leaves"] < args.rebalances
            or counts["broker_kills"] < args.broker_kills):
        log("FAILED")
        sys.exit(1)
    log("passed")


if __name__ == "__main__":
    main()
