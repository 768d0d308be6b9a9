"""Score parity of the Kafka Streams peer with fraudstream (run by `parity`).

For each sample (`shop`: bench/gen_payloads.py's transactions and navigation events;
`sparkov`: the first N transactions of tests/data/sparkov-sample.jsonl.gz):

1. the events go, unkeyed, in event-time order (navigation first at equal times, as
   `fraudstream replay` orders them) into partition 0 of fresh topics on a real broker, each
   record's timestamp set to its event time, so Kafka Streams' timestamp-ordered merge of the
   two topics is that order too; with --partitions N > 1 the topics have N partitions and one
   task re-keys everything, so each partition of the repartition topic receives its
   customers' events in that order, and each task's merchant profiles are the hash-sample
   that `fraudstream replay --partitions N` computes;
2. the peer (`run --emit-features`) scores them; its verdicts (read_committed) carry every
   feature value;
3. `fraudstream replay --partitions N` computes the features of the same files, and
   onnxruntime (Python) scores them with the same model;
4. per feature the largest difference, over the features both compute, and of the score;
   a difference above the tolerance, a missing or duplicated verdict, or a verdict whose
   record timestamp is not its transaction's, fails the check.
"""

import argparse
import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime

import numpy as np
import onnxruntime as ort
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

HERE = os.path.dirname(os.path.abspath(__file__))


def event_time_ms(value):
    if isinstance(value, int):
        return value
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


def write_sample(args, sample, work):
    """The sample's transactions.jsonl and navigation.jsonl in `work`."""
    tx_path, nav_path = os.path.join(work, "transactions.jsonl"), os.path.join(work, "navigation.jsonl")
    if sample == "shop":
        subprocess.run([sys.executable, os.path.join(args.repo, "bench", "gen_payloads.py"),
                        "--transactions", str(args.transactions), "--out", work, "--seed", "1"],
                       check=True, stdout=subprocess.DEVNULL)
    else:
        with gzip.open(os.path.join(args.repo, "tests", "data", "sparkov-sample.jsonl.gz"), "rt") as src, \
                open(tx_path, "w") as out:
            for i, line in enumerate(src):
                if i == args.transactions:
                    break
                out.write(line)
        open(nav_path, "w").close()
    return tx_path, nav_path


def load_events(tx_path, nav_path):
    """(time, is_tx, line) in replay's order: by event time, navigation first, else file order."""
    events = []
    for path, is_tx in ((tx_path, True), (nav_path, False)):
        with open(path) as f:
            for line in f:
                if line.strip():
                    events.append((event_time_ms(json.loads(line)["event_time"]), is_tx, line.rstrip("\n")))
    events.sort(key=lambda e: (e[0], e[1]))
    return events


def produce(bootstrap, topics, events):
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    for t, is_tx, line in events:
        while True:
            try:
                p.produce(topics["transactions" if is_tx else "navigation"], value=line.encode(),
                          partition=0, timestamp=t)
                break
            except BufferError:
                p.poll(0.1)
    if p.flush(60) != 0:
        sys.exit("could not produce the sample")


def read_verdicts(bootstrap, topic, partitions, want, timeout, peer):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"parity-{time.time_ns()}",
                  "enable.auto.commit": False, "isolation.level": "read_committed"})
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    verdicts, duplicates = {}, 0
    deadline = time.time() + timeout
    while len(verdicts) < want and time.time() < deadline and peer.poll() is None:
        for m in c.consume(1000, 0.5):
            if m.error():
                continue
            v = json.loads(m.value())
            if v["transaction_id"] in verdicts:
                duplicates += 1
            verdicts[v["transaction_id"]] = (v, m.timestamp()[1])
    c.close()
    return verdicts, duplicates


def replay(args, work, tx_path, nav_path, secret):
    """fraudstream's features of the sample (a copy of the binary: a build may replace it)."""
    binary = os.path.join(work, "fraudstream")
    shutil.copy(args.fraudstream, binary)
    out = os.path.join(work, "replay.csv")
    inputs = ["--input", tx_path] + (["--input", nav_path] if os.path.getsize(nav_path) else [])
    subprocess.run([binary, "replay", *inputs, "--output", out, "--partitions", str(args.partitions), "--quiet"],
                   check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, FRAUDSTREAM__STATE__HMAC_SECRET=secret))
    with open(out) as f:
        return {row["transaction_id"]: row for row in csv.DictReader(f)}


def check(args, sample):
    run = f"parity-{sample}-p{args.partitions}-{time.time_ns() // 1_000_000}"
    work = tempfile.mkdtemp(prefix=f"{run}-")
    tx_path, nav_path = write_sample(args, sample, work)
    events = load_events(tx_path, nav_path)
    tx_times = {json.loads(line)["transaction_id"]: t for t, is_tx, line in events if is_tx}
    topics = {t: f"{run}-{t}" for t in ("transactions", "navigation", "verdicts")}
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    for f in admin.create_topics([NewTopic(name, args.partitions, 1) for name in topics.values()]).values():
        f.result()
    produce(args.bootstrap, topics, events)
    print(f"{sample}: {len(tx_times)} transactions and {len(events) - len(tx_times)} navigation events "
          f"produced to {topics['transactions']}, {topics['navigation']}")

    secret = os.urandom(16).hex()
    log = open(os.path.join(work, "peer.log"), "w")
    started = time.time()
    peer = subprocess.Popen(
        [os.path.join(HERE, "run"), "--bootstrap", args.bootstrap, "--guarantee", args.guarantee,
         "--transactions", topics["transactions"], "--navigation", topics["navigation"],
         "--verdicts", topics["verdicts"], "--application-id", run,
         "--state-dir", os.path.join(work, "state"), "--emit-features"],
        stdout=log, stderr=log, env=dict(os.environ, FRAUDSTREAM__STATE__HMAC_SECRET=secret))
    try:
        verdicts, duplicates = read_verdicts(args.bootstrap, topics["verdicts"], args.partitions, len(tx_times),
                                            args.timeout, peer)
    finally:
        if peer.poll() is None:
            peer.send_signal(signal.SIGTERM)
        code = peer.wait(90)
    print(f"{sample}: {len(verdicts)} verdicts in {time.time() - started:.1f} s (peer exit status {code}; "
          f"log {log.name})")

    expected = replay(args, work, tx_path, nav_path, secret)
    with open(os.path.join(args.repo, "models", "sparkov-xgb.manifest.json")) as f:
        manifest = json.load(f)
    model = ort.InferenceSession(os.path.join(args.repo, "models", manifest["onnx"]))
    ids = [i for i in expected if i in verdicts]
    rows = np.array([[float(expected[i][n]) for n in manifest["features"]] for i in ids], dtype=np.float32)
    scores = model.run([manifest["output"]], {manifest["input"]: rows})[0][:, manifest["output_column"]]

    failures = []
    missing = len(tx_times) - len(ids)
    if missing or duplicates:
        failures.append(f"{missing} verdicts missing, {duplicates} duplicated")
    late = sum(1 for i in ids if verdicts[i][1] != tx_times[i])
    if late:
        failures.append(f"{late} verdicts without their transaction's record timestamp")
    names = [n for n in verdicts[ids[0]][0]["features"] if n in expected[ids[0]]] if ids else []
    print(f"{'feature':<36} max |peer - fraudstream|")
    for n in names:
        peer_values = np.array([verdicts[i][0]["features"][n] for i in ids], dtype=np.float32)
        want = np.array([float(expected[i][n]) for i in ids], dtype=np.float32)
        diff = float(np.max(np.abs(peer_values.astype(np.float64) - want.astype(np.float64))))
        flag = "" if diff <= args.tolerance else "  MISMATCH"
        print(f"{n + (' (model)' if n in manifest['features'] else ''):<36} {diff:.3g}{flag}")
        if flag:
            failures.append(f"feature {n} differs by {diff:.3g}")
    peer_scores = np.array([verdicts[i][0]["score"] for i in ids], dtype=np.float64)
    score_diff = float(np.max(np.abs(peer_scores - scores.astype(np.float64)))) if ids else 0.0
    print(f"{'score (vs onnxruntime in Python)':<36} {score_diff:.3g}{'' if score_diff <= args.tolerance else '  MISMATCH'}")
    if score_diff > args.tolerance:
        failures.append(f"score differs by {score_diff:.3g}")
    decide = lambda s: "decline" if s >= manifest["thresholds"]["decline"] else (
        "review" if s >= manifest["thresholds"]["review"] else "approve")
    decisions = sum(1 for i, s in zip(ids, scores) if verdicts[i][0]["decision"] != decide(float(s)))
    if decisions:
        failures.append(f"{decisions} decisions differ")
    flagged = sum(1 for i in ids if verdicts[i][0]["decision"] != "approve")
    print(f"{sample}: {len(ids)} transactions compared, {flagged} reviewed or declined, "
          f"{decisions} decisions differ; {'FAIL: ' + '; '.join(failures) if failures else 'OK'}")
    if not failures:
        shutil.rmtree(work, ignore_errors=True)
    return not failures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default="127.0.0.1:29092")
    ap.add_argument("--samples", default="shop,sparkov", help="comma-separated: shop, sparkov")
    ap.add_argument("--transactions", type=int, default=5000)
    ap.add_argument("--partitions", type=int, default=1, help="of every topic (replay --partitions)")
    ap.add_argument("--guarantee", default="exactly_once_v2", choices=["at_least_once", "exactly_once_v2"])
    ap.add_argument("--tolerance", type=float, default=1e-5)
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for the verdicts")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--fraudstream", required=True)
    args = ap.parse_args()
    ok = [check(args, s) for s in args.samples.split(",")]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
