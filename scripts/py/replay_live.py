"""Replays a JSON-lines sample of transactions into Kafka as live traffic: the Docker stack's
feed (docker-compose.yml, service `replay`), so its dashboard shows the scorer at work.

    replay_live.py --bootstrap HOST:PORT --sample tests/data/sparkov-sample.jsonl.gz
                   [--topic transactions] [--rate 200] [--loop]

The sample is sent in file order at --rate transactions per second of wall-clock time, each
record keyed by its customer id and partitioned by murmur2 as the Java client does (what
fraudstream's co-partitioned inputs expect). Every record's `event_time` becomes the moment it
is sent (integer epoch milliseconds), so the scorer's end-to-end latency measures the pipeline,
not the age of the sample. Every pass gives the transaction, customer and card ids a suffix of
its own (`-<run>p<pass>`, <run> from the start time), so a pass never meets the state of an
earlier pass or of an earlier run of this script.

The limit: the sample's days play in seconds (10,000 records, 21 days: 50 s at 200/s), so the
time-window features see bursts the original data does not have, and verdicts are not those of
the original timeline. This is load for the dashboard; scripts/demo keeps the sample's spacing
of event times and scores the verdicts.
"""

import argparse
import gzip
import json
import signal
import sys
import time

from confluent_kafka import Producer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--topic", default="transactions")
    ap.add_argument("--sample", required=True, help="JSON lines, gzipped or not")
    ap.add_argument("--rate", type=float, default=200, help="transactions per second (default 200)")
    ap.add_argument("--loop", action="store_true", help="replay again and again until stopped")
    args = ap.parse_args()

    with (gzip.open if args.sample.endswith(".gz") else open)(args.sample, "rt") as f:
        sample = [json.loads(line) for line in f if line.strip()]
    if not sample:
        sys.exit(f"error: {args.sample} holds no transaction")

    failed = 0

    def delivered(err, _msg):
        nonlocal failed
        if err is not None:
            failed += 1
            if failed <= 10:
                print(f"delivery failed: {err}", file=sys.stderr)

    producer = Producer({
        "bootstrap.servers": args.bootstrap,
        "client.id": "fraudstream-replay",
        "partitioner": "murmur2_random",
        "linger.ms": 5,
        # A customer's events keep their order through retries: features follow it.
        "enable.idempotence": True,
    })
    # `docker compose stop` sends SIGTERM: stop sending, flush, exit. A flag, not an exception:
    # one raised inside the client's poll() would not unwind cleanly.
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    run = f"{int(time.time()):x}"
    n = 0
    while not stopping:
        suffix = f"-{run}p{n}"
        start = time.monotonic()
        sent = 0
        for tx in sample:
            # Pace on the pass's start, not on the previous send: no drift.
            while (wait := start + sent / args.rate - time.monotonic()) > 0 and not stopping:
                producer.poll(wait)
            if stopping:
                break
            tx = dict(
                tx,
                transaction_id=tx["transaction_id"] + suffix,
                customer_id=tx["customer_id"] + suffix,
                event_time=int(time.time() * 1000),
            )
            if "card_id" in tx:
                tx["card_id"] += suffix
            value = json.dumps(tx, separators=(",", ":"))
            while True:
                try:
                    producer.produce(args.topic, value, key=tx["customer_id"], on_delivery=delivered)
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    producer.poll(0.1)
            producer.poll(0)
            sent += 1
        print(
            f"pass {n}: {sent} transactions in {time.monotonic() - start:.1f} s (ids *{suffix}); "
            f"{failed} failed deliveries so far",
            file=sys.stderr,
            flush=True,
        )
        n += 1
        if not args.loop:
            break
    left = producer.flush(10)
    if left:
        print(f"{left} transactions undelivered at exit", file=sys.stderr)
    sys.exit(1 if failed or left else 0)

if __name__ == "__main__":
    main()
