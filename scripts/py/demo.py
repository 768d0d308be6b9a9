"""The demo client: replays the committed Sparkov held-out sample (JSON transactions) through a
running fraudstream, reads the verdicts and dead letters back, and prints a summary.

It is an ordinary Kafka client (confluent-kafka), independent of fraudstream's own code:
what it shows is what any producer and consumer of the topics would see.
"""

import argparse
import datetime
import gzip
import json
import sys
import threading
import time
import urllib.request

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition


def load_sample(path):
    """The sample's JSON lines, in event-time order, with their labels."""
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            tx = json.loads(line)
            out.append({"tx": tx, "label": int(tx.pop("is_fraud"))})
    return out


def shifted(tx, rep, weeks):
    """Repetition `rep` of a sample transaction: new ids (new customers and cards, so each
    repetition is scored from the same empty history) and an event time `rep * weeks` weeks
    later (the same hour and weekday, and never behind the state's idle horizon)."""
    if rep == 0:
        return tx
    t = dict(tx)
    t["transaction_id"] = f"{tx['transaction_id']}-r{rep}"
    t["customer_id"] = f"{tx['customer_id']}-r{rep}"
    t["card_id"] = f"{tx['card_id']}-r{rep}"
    when = datetime.datetime.fromisoformat(tx["event_time"].replace("Z", "+00:00"))
    when += datetime.timedelta(weeks=rep * weeks)
    t["event_time"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return t


def wait_ready(addr, timeout):
    """Waits until fraudstream's /readyz says partitions are assigned."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://{addr}/readyz", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"fraudstream not ready after {timeout} s")


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--transactions", required=True)
    ap.add_argument("--verdicts", required=True)
    ap.add_argument("--dead-letter", required=True)
    ap.add_argument("--sample", required=True)
    ap.add_argument("--repeat", type=int, default=3, help="replay the sample this many times (new ids each time)")
    ap.add_argument("--metrics", default="", help="fraudstream's metrics address, to show a few lines")
    ap.add_argument("--rate", type=float, default=3000, help="transactions per second to offer (0 = as fast as possible)")
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()

    sample = load_sample(args.sample)
    if args.metrics:
        wait_ready(args.metrics, args.timeout)
    # A few malformed messages, to show that they are dead-lettered and nothing stops.
    bad = [
        b"this is not json",
        b'{"transaction_id": "bad-1", "event_time": 0}',
        b'{"transaction_id":"bad-2","event_time":1,"customer_id":"c","merchant_id":"m","amount":-5,"currency":"USD"}',
    ]

    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": f"demo-reader-{time.time_ns()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    # Read every partition from the start without joining a group (no rebalance delay).
    metadata = consumer.list_topics(timeout=10)
    consumer.assign([
        TopicPartition(t, p, OFFSET_BEGINNING)
        for t in (args.verdicts, args.dead_letter)
        for p in metadata.topics[t].partitions
    ])

    # Read verdicts while producing, in a thread, so latency is measured as it happens.
    state = {"verdicts": {}, "dead": [], "latencies": [], "last": None}
    expected = len(sample) * args.repeat

    def read():
        verdicts, dead, latencies = state["verdicts"], state["dead"], state["latencies"]
        deadline = time.time() + args.timeout
        while (len(verdicts) < expected or len(dead) < len(bad)) and time.time() < deadline:
            m = consumer.poll(0.2)
            if m is None or m.error():
                continue
            if m.topic() == args.dead_letter:
                dead.append({k: v.decode() for k, v in (m.headers() or []) if v is not None})
                continue
            now = time.time() * 1000
            v = json.loads(m.value())
            state["last"] = now
            tx_id = v["transaction_id"]
            sent = sent_at.get(tx_id)
            if sent is not None and tx_id not in verdicts:
                verdicts[tx_id] = v
                latencies.append(now - sent)
        consumer.close()

    reader = threading.Thread(target=read, daemon=True)
    # murmur2 of the key, as the Java client: each transaction lands on its customer's
    # partition, so fraudstream scores it there without a hop through the repartition topic.
    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 5, "partitioner": "murmur2_random",
                         "enable.idempotence": True})
    sent_at = {}
    labels = {}
    total = len(sample) * args.repeat
    print(f"Replaying {len(sample)} held-out Sparkov transactions x {args.repeat} = {total}, plus {len(bad)} malformed messages.",
          file=sys.stderr)
    first = datetime.datetime.fromisoformat(sample[0]["tx"]["event_time"].replace("Z", "+00:00"))
    last = datetime.datetime.fromisoformat(sample[-1]["tx"]["event_time"].replace("Z", "+00:00"))
    # Whole weeks past the sample's span plus the 7-day idle horizon.
    weeks = (last - first).days // 7 + 2
    t0 = time.time()
    reader.start()
    i = 0
    for rep in range(args.repeat):
        for r in sample:
            tx = shifted(r["tx"], rep, weeks)
            tx_id, customer = tx["transaction_id"], tx["customer_id"]
            value = json.dumps(tx, separators=(",", ":"))
            now_ms = int(time.time() * 1000)
            sent_at[tx_id] = now_ms
            labels[tx_id] = r["label"]
            while True:
                try:
                    producer.produce(args.transactions, key=customer, value=value)
                    break
                except BufferError:
                    producer.poll(0.01)
            i += 1
            if i % 10 == 0:
                producer.poll(0)
                if args.rate > 0:
                    ahead = t0 + i / args.rate - time.time()
                    if ahead > 0:
                        time.sleep(ahead)
            if i == total // 2:
                for b in bad:
                    producer.produce(args.transactions, key=b"bad", value=b)
    producer.flush(30)
    produced_s = time.time() - t0

    reader.join()
    verdicts, dead, latencies = state["verdicts"], state["dead"], state["latencies"]
    last_verdict = state["last"]

    decisions = {"approve": 0, "review": 0, "decline": 0}
    caught = {"approve": 0, "review": 0, "decline": 0}
    for tx_id, v in verdicts.items():
        decisions[v["decision"]] += 1
        if labels[tx_id]:
            caught[v["decision"]] += 1
    frauds = sum(labels.values())
    latencies.sort()
    elapsed = (last_verdict - t0 * 1000) / 1000 if last_verdict else float("nan")
    model = next(iter(verdicts.values()))["model_version"] if verdicts else "?"

    print()
    print("fraudstream demo summary")
    print("------------------------")
    print(f"model                 {model}")
    offered = f"{args.rate:.0f}/s offered" if args.rate > 0 else "unthrottled"
    print(f"transactions sent     {total}  (in {produced_s:.1f} s, {offered})")
    print(f"verdicts received     {len(verdicts)}  ({'all' if len(verdicts) == total else 'MISSING ' + str(total - len(verdicts))})")
    for d in ("approve", "review", "decline"):
        print(f"  {d:<8}            {decisions[d]:>6}  ({100 * decisions[d] / max(1, len(verdicts)):.2f} %)")
    print(f"frauds (labels)       {frauds}: declined {caught['decline']}, reviewed {caught['review']}, "
          f"approved {caught['approve']}  -> caught {100 * (caught['decline'] + caught['review']) / max(1, frauds):.1f} %")
    flagged = decisions["decline"] + decisions["review"]
    print(f"precision of flags    {100 * (caught['decline'] + caught['review']) / max(1, flagged):.1f} % "
          f"(the sample keeps every card with a fraud in its 21 days: {100 * frauds / max(1, total):.1f} % fraud vs 0.46 % in the period)")
    bound = "bounded by the offered rate, see --rate" if args.rate > 0 else "unthrottled"
    print(f"throughput            {len(verdicts) / elapsed:.0f} verdicts/s (first send to last verdict; {bound})")
    print(f"latency (sent->read)  p50 {percentile(latencies, 50):.0f} ms, p99 {percentile(latencies, 99):.0f} ms, "
          f"max {latencies[-1] if latencies else float('nan'):.0f} ms")
    declined = [v for v in verdicts.values() if v["decision"] == "decline"]
    if declined:
        print(f"a declined verdict    {json.dumps(declined[0])}")
    print(f"dead letters          {len(dead)}: " + ", ".join(sorted(d.get('fraudstream.error.kind', '?') for d in dead)))
    if args.metrics:
        try:
            text = urllib.request.urlopen(f"http://{args.metrics}/metrics", timeout=5).read().decode()
            print("metrics (excerpt)")
            for line in text.splitlines():
                if line.startswith(("fraudstream_verdicts_total", "fraudstream_dead_letters_total")) and not line.endswith(" 0"):
                    print(f"  {line}")
        except OSError as e:
            print(f"metrics unavailable: {e}")
    ok = len(verdicts) == total and len(dead) == len(bad)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
