"""Broker restarts mid-stream (docs/RELIABILITY.md): a broker on durable storage (nisshi with
sqlite) is SIGKILLed twice while fraudstream scores, and started again on the same storage.
Checks, against a clean run of the same input on the same broker: every transaction has a
verdict, duplicates are identical, every verdict equals the clean one, and the final state
(`fraudstream state-export`) is identical: nothing lost, nothing applied twice.

    python scripts/py/broker_restart.py --bin target/.../fraudstream --nisshi PATH
        [--transactions 20000] [--restarts 2]

Prints a JSON summary; exits 1 if a check fails.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import Instance, Verdicts, compare, create_topics, export, free_port, log, produce_input  # noqa: E402


class Broker:
    def __init__(self, nisshi, work):
        self.nisshi, self.work = nisshi, work
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        listener = f"tcp://{self.url}"
        self.proc = subprocess.Popen(
            [self.nisshi, "broker", "--listener-url", listener, "--advertised-listener-url", listener,
             "--storage-engine", "sqlite://nisshi.db"],
            cwd=self.work, stdout=open(os.path.join(self.work, "broker.log"), "a"), stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        import socket
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise SystemExit("the durable broker did not start")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


def score(args, work, run_id, name, topics_in, broker, restarts):
    group = f"{run_id}-{name}"
    topics = dict(topics_in, verdicts=f"{group}-verdicts", dlq=f"{group}-dlq")
    create_topics(args, [(topics["verdicts"], args.partitions), (topics["dlq"], 1)])
    n = args.transactions
    reader = Verdicts(args, topics["verdicts"], args.partitions)
    instance = Instance(args, group, topics, "i0", work)
    instance.start()
    marks = [int(n * (j + 1) / (restarts + 1)) for j in range(restarts)]
    done = 0
    t0 = time.time()
    deadline = t0 + args.timeout
    while len(reader.by_id) < n:
        reader.poll(0.2)
        if time.time() > deadline:
            raise SystemExit(f"{name}: only {len(reader.by_id)} of {n} verdicts; log {instance.logpath}")
        if not instance.running():
            raise SystemExit(f"{name}: fraudstream exited ({instance.proc.returncode}); log {instance.logpath}")
        if marks and len(reader.by_id) >= marks[0]:
            marks.pop(0)
            log(f"{name}: SIGKILL the broker at {len(reader.by_id)} verdicts; back in {args.down} s")
            broker.kill()
            time.sleep(args.down)
            broker.start()
            done += 1
    elapsed = time.time() - t0
    reader.poll(2)
    instance.stop()
    state = export(args, instance, os.path.join(work, f"{group}.state"))
    return reader, state, done, elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--nisshi", required=True)
    ap.add_argument("--transactions", type=int, default=20_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--down", type=float, default=3.0, help="seconds the broker stays down")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="fraudstream-broker-restart-")
    broker = Broker(args.nisshi, work)
    broker.start()
    args.bootstrap = broker.url
    run_id = f"restart-{os.getpid()}"
    topics = {"tx": f"{run_id}-tx", "nav": f"{run_id}-nav", "labels": f"{run_id}-labels",
              "blocklist": f"{run_id}-blocklist"}
    create_topics(args, [(topics["tx"], args.partitions), (topics["nav"], args.partitions),
                         (topics["labels"], 1), (topics["blocklist"], 1)])
    produce_input(args, topics)
    try:
        clean, clean_state, _, clean_s = score(args, work, run_id, "clean", topics, broker, 0)
        hit, hit_state, restarts, hit_s = score(args, work, run_id, "restarts", topics, broker, args.restarts)
    finally:
        broker.kill()

    fields, ok = compare(clean, clean_state, hit, hit_state)
    summary = {
        "transactions": args.transactions, "navigation_events": args.transactions,
        "broker_restarts": restarts, "seconds_down_each": args.down, **fields,
        "clean_seconds": round(clean_s, 1), "restart_run_seconds": round(hit_s, 1), "work": work,
    }
    print(json.dumps(summary, indent=1))
    if not ok or restarts < args.restarts:
        log("FAILED")
        sys.exit(1)
    log("passed")


if __name__ == "__main__":
    main()
