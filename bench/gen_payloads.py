"""Writes payload files of realistic transactions and navigation events (bench/workload.py:
customers who browse then buy, card-testing bursts, account takeovers, amount spikes), one
JSON object per line, for `kafka-producer-perf-test --payload-file` (`scripts/kafka-cli`).

    python bench/gen_payloads.py --transactions 100000 --out DIR [--rate 1000] [--seed 1]

DIR/transactions.jsonl and DIR/navigation.jsonl, each in event-time order (purchases `1/rate`
seconds apart from 2026-11-01). The perf tools send these unkeyed and in random order:
fraudstream re-keys them by customer through its repartition topic, and a random order is
not event-time order (the features of such a run are not those of a replay).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import Shop, encode  # noqa: E402

T0 = 1_793_491_200_000  # 2026-11-01T00:00:00Z


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--transactions", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rate", type=float, default=1000, help="purchases per second of event time")
    ap.add_argument("--customers", type=int, default=5000)
    ap.add_argument("--merchants", type=int, default=200)
    ap.add_argument("--fraud-share", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    shop = Shop(args.customers, args.merchants, args.fraud_share, args.seed)
    events = []
    txs = i = 0
    while txs < args.transactions:
        for ev in shop.purchase(T0 + int(i * 1000 / args.rate)):
            if ev[0] == "tx":
                txs += 1
            events.append(ev)
        i += 1
    events.sort(key=lambda e: e[2]["event_time"])
    os.makedirs(args.out, exist_ok=True)
    counts = {"tx": 0, "nav": 0}
    frauds = 0
    with open(os.path.join(args.out, "transactions.jsonl"), "w") as tx, \
            open(os.path.join(args.out, "navigation.jsonl"), "w") as nav:
        for kind, _, ev in events:
            (tx if kind == "tx" else nav).write(encode(ev) + "\n")
            counts[kind] += 1
            frauds += ev.get("is_fraud", 0)
    print(f"{counts['tx']} transactions ({frauds} fraud) and {counts['nav']} navigation events in {args.out}")


if __name__ == "__main__":
    main()
