"""Small admin tasks on a Kafka cluster, for the scripts (an independent client:
confluent-kafka).

    kafka_admin.py --bootstrap HOST:PORT ready [--timeout S]
        exit 0 once the cluster answers a metadata request with at least one broker
    kafka_admin.py --bootstrap HOST:PORT topics [--partitions N] [--compact] NAME...
        create the topics that do not exist yet (replication factor 1)
"""

import argparse
import sys

from confluent_kafka.admin import AdminClient, NewTopic


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--ca", help="CA certificate (PEM) of a TLS listener")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ready = sub.add_parser("ready")
    ready.add_argument("--timeout", type=float, default=5)
    topics = sub.add_parser("topics")
    topics.add_argument("--partitions", type=int, default=3)
    topics.add_argument("--compact", action="store_true", help="cleanup.policy=compact")
    topics.add_argument("names", nargs="+")
    args = ap.parse_args()

    conf = {"bootstrap.servers": args.bootstrap}
    if args.ca:
        conf.update({"security.protocol": "ssl", "ssl.ca.location": args.ca})
    admin = AdminClient(conf)
    if args.cmd == "ready":
        try:
            md = admin.list_topics(timeout=args.timeout)
        except Exception as e:  # noqa: BLE001 - not ready is the answer
            sys.exit(f"not ready: {e}")
        sys.exit(0 if md.brokers else "not ready: no broker in the metadata")

    existing = set(admin.list_topics(timeout=10).topics)
    config = {"cleanup.policy": "compact"} if args.compact else {}
    new = [
        NewTopic(n, num_partitions=args.partitions, replication_factor=1, config=config)
        for n in args.names
        if n not in existing
    ]
    for name, fut in admin.create_topics(new).items() if new else []:
        try:
            fut.result(timeout=15)
            print(f"created topic {name} ({args.partitions} partitions)", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - report and fail
            sys.exit(f"error: cannot create topic {name}: {e}")


if __name__ == "__main__":
    main()
