"""Creates Kafka topics if they do not exist yet (the local broker does not auto-create)."""

import argparse
import sys

from confluent_kafka.admin import AdminClient, NewTopic


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("names", nargs="+")
    args = ap.parse_args()
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    existing = set(admin.list_topics(timeout=10).topics)
    new = [NewTopic(n, num_partitions=args.partitions, replication_factor=1) for n in args.names if n not in existing]
    for name, fut in admin.create_topics(new).items() if new else []:
        try:
            fut.result(timeout=15)
            print(f"created topic {name} ({args.partitions} partitions)", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - report and fail
            sys.exit(f"error: cannot create topic {name}: {e}")


if __name__ == "__main__":
    main()
