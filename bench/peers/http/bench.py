"""Benchmarks the HTTP scoring peer (app.py under gunicorn with uvicorn workers) with oha, for
the figures that stand beside fraudstream's (bench/e2e). Run by bench/peers/http/run, which
installs what this needs; see the README beside it.

Steps: start gunicorn on a free port of 127.0.0.1 and wait until it answers; check that it
serves the model (its scores of sample rows equal ONNX Runtime's in this process to 1e-6);
then, with request bodies drawn from the ULB held-out sample:
- saturation: closed loop (each of --connections connections sends its next request when the
  last is answered) for --saturation-seconds: the most the server answers per second;
- one open-loop phase per --rates entry: R requests/s on a schedule for --seconds, latency
  taken from each request's scheduled send time (oha --latency-correction), so time spent
  queued behind a slow server counts; stops after the first rate the server does not sustain
  (under 90 % of it answered, or any error).
Per run: CPU seconds (utime + stime from /proc) of gunicorn's master and workers and, apart, of
oha; the peak of the server processes' summed resident memory (VmRSS, sampled every 0.25 s).
"""

import argparse
import csv
import ctypes
import gzip
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from importlib import metadata

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
TICK = os.sysconf("SC_CLK_TCK")
SAMPLE = os.path.join(REPO, "tests", "data", "ulb-holdout-sample.csv.gz")
# oha reports the requests still in flight when a timed run ends as this error: they were
# cut off by the load generator, not failed by the server.
DEADLINE = "aborted due to deadline"


def proc_stat(pid):
    """(parent pid, CPU seconds) of a process; the command name may contain spaces and
    parentheses, so the fields are taken after its last ')'."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def proc_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def die_with_parent():
    """Run in a child before exec: the kernel sends it SIGTERM if this runner dies, even by
    SIGKILL, so neither the server nor oha outlives a run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """gunicorn with `workers` uvicorn workers serving app.py, and its processes in /proc."""

    def __init__(self, workers, manifest, log_path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--workers", str(workers),
             "--worker-class", "uvicorn_worker.UvicornWorker", "--bind", f"127.0.0.1:{self.port}",
             "--chdir", HERE, "--log-level", "warning", "app:app"],
            env={**os.environ, "FRAUDSTREAM_MODEL": manifest},
            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.worker_pids = set()

    def pids(self):
        """The master and its children, read anew each time: a worker gunicorn restarts is a
        new process."""
        pids = [self.proc.pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if proc_stat(entry)[0] == self.proc.pid:
                        pids.append(int(entry))
                except (FileNotFoundError, ProcessLookupError):
                    pass
        return pids

    def _sum(self, read):
        total = 0
        for pid in self.pids():
            try:
                total += read(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def cpu_s(self):
        return self._sum(lambda pid: proc_stat(pid)[1])

    def rss(self):
        return self._sum(proc_rss)

    def wait_ready(self, workers, timeout=60):
        """Until /health answers and every worker has started (each loads its own model)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"gunicorn exited ({self.proc.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    version = json.load(r)["model_version"]
                if len(self.pids()) == workers + 1:
                    self.worker_pids = set(self.pids()[1:])
                    return version
            except OSError:
                pass
            time.sleep(0.2)
        sys.exit(f"gunicorn not ready after {timeout} s; see {self.log.name}")

    def restarted_workers(self):
        return len(set(self.pids()[1:]) - self.worker_pids)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class RssSampler(threading.Thread):
    """The highest summed VmRSS of the server processes seen since the last `take`."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.peak, self.overall = server, 0, 0

    def run(self):
        while True:
            rss = self.server.rss()
            self.peak, self.overall = max(self.peak, rss), max(self.overall, rss)
            time.sleep(0.25)

    def take(self):
        peak, self.peak = self.peak, 0
        return round(peak / 2**20, 1)


def load_sample(features):
    with gzip.open(SAMPLE, "rt") as f:
        return [[float(row[name]) for name in features] for row in csv.DictReader(f)]


def check_parity(url, manifest_path, manifest, rows, n=20):
    """POSTs n sample rows and compares the answers with ONNX Runtime run here on the same
    file: proof that the peer serves the model fraudstream serves, through the same features."""
    session = ort.InferenceSession(os.path.join(os.path.dirname(manifest_path), manifest["onnx"]),
                                   providers=["CPUExecutionProvider"])
    picked = rows[::max(1, len(rows) // n)][:n]
    expected = session.run([manifest["output"]], {manifest["input"]: np.array(picked, np.float32)})[0]
    worst = 0.0
    for row, probabilities in zip(picked, expected):
        body = json.dumps(dict(zip(manifest["feature_sources"], row))).encode()
        request = urllib.request.Request(url + "/predict", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            answer = json.load(r)
        if answer["model_version"] != manifest["model_version"]:
            sys.exit(f"peer answers model_version {answer['model_version']!r}")
        worst = max(worst, abs(answer["score"] - float(probabilities[manifest["output_column"]])))
    if worst > 1e-6:
        sys.exit(f"peer's scores differ from ONNX Runtime's by up to {worst:g}")
    return {"rows": len(picked), "max_abs_diff": worst}


def oha(args, url, bodies, rate=None):
    """One oha run; returns its JSON report and its CPU seconds. oha is the only child reaped
    meanwhile (gunicorn is reaped at the end), so the change in RUSAGE_CHILDREN is its own."""
    cmd = [args.oha, url + "/predict", "-m", "POST", "-T", "application/json", "-Z", bodies,
           "-c", str(args.connections), "-z", f"{args.seconds if rate else args.saturation_seconds}s",
           "--no-tui", "--output-format", "json"]
    if rate:
        cmd += ["-q", str(rate), "--latency-correction"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=die_with_parent)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode:
        sys.exit(f"oha failed ({run.returncode}): {run.stderr.strip()}")
    return json.loads(run.stdout), (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 2)


def measure(args, server, sampler, bodies, rate=None):
    """A phase: oha against the server, with the CPU both spent and the server's peak memory."""
    cpu0 = server.cpu_s()
    sampler.take()
    report, gen_cpu = oha(args, server.url, bodies, rate)
    cpu = server.cpu_s() - cpu0
    codes = report["statusCodeDistribution"]
    answered = sum(n for code, n in codes.items() if code.startswith("2"))
    failures = {e: n for e, n in report["errorDistribution"].items() if e != DEADLINE}
    errors = sum(codes.values()) - answered + sum(failures.values())
    pct = report["latencyPercentiles"]

    def per_100k(seconds):
        return round(seconds * 100_000 / answered, 2) if answered else None

    phase = {
        "achieved": round(answered / report["summary"]["total"], 1),
        "answered": answered,
        "p50_ms": ms(pct["p50"]), "p99_ms": ms(pct["p99"]), "p999_ms": ms(pct["p99.9"]),
        "max_ms": ms(report["summary"]["slowest"]),
        "errors": errors, "error_kinds": failures,
        "cut_off_at_end": report["errorDistribution"].get(DEADLINE, 0),
        "server_cpu_s": round(cpu, 2), "server_cpu_s_per_100k": per_100k(cpu),
        "loadgen_cpu_s": round(gen_cpu, 2), "loadgen_cpu_s_per_100k": per_100k(gen_cpu),
        "peak_rss_mb": sampler.take(),
        "restarted_workers": server.restarted_workers(),
    }
    if rate:
        phase = {"rate": rate, **phase,
                 "fell_behind": phase["achieved"] < 0.9 * rate or errors > 0}
    return phase


def versions():
    v = metadata.version
    return (f"gunicorn {v('gunicorn')}, uvicorn {v('uvicorn')} (uvicorn-worker {v('uvicorn-worker')}, "
            f"uvloop {v('uvloop')}, httptools {v('httptools')}), FastAPI {v('fastapi')}, "
            f"pydantic {v('pydantic')}, onnxruntime {v('onnxruntime')}, Python {platform.python_version()}")


def table(result):
    head = ("| phase | achieved req/s | p50 | p99 | p99.9 | max | errors | server CPU-s / 100k "
            "| oha CPU-s / 100k | peak RSS |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, p in [("saturation (closed loop)", result["saturation"])] + [
            (f"{p['rate']:,}/s" + (" (fell behind)" if p["fell_behind"] else ""), p)
            for p in result["phases"]]:
        lines.append(f"| {name} | {p['achieved']:,.0f} | {p['p50_ms']} ms | {p['p99_ms']} ms "
                     f"| {p['p999_ms']} ms | {p['max_ms']} ms | {p['errors']} "
                     f"| {p['server_cpu_s_per_100k']} | {p['loadgen_cpu_s_per_100k']} | {p['peak_rss_mb']} MB |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oha", required=True, help="the oha binary")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2: one a core)")
    ap.add_argument("--rates", default="1000,5000,10000,20000", help="open-loop rates, req/s")
    ap.add_argument("--seconds", type=int, default=30, help="length of each rate phase")
    ap.add_argument("--saturation-seconds", type=int, default=30)
    ap.add_argument("--connections", type=int, default=64,
                    help="oha's keep-alive connections (open-loop requests wait for a free one, "
                         "and that wait counts in their latency)")
    ap.add_argument("--model", default=os.path.join(REPO, "models", "ulb-xgb.manifest.json"))
    ap.add_argument("--work", required=True, help="directory for the request bodies and gunicorn's log")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", f"http-{int(time.time())}.json"))
    args = ap.parse_args()
    # The default SIGTERM ends Python without running `finally`: make it an exit that does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    manifest = json.load(open(args.model))
    rows = load_sample(manifest["feature_sources"])
    os.makedirs(args.work, exist_ok=True)
    bodies = os.path.join(args.work, "bodies.jsonl")
    with open(bodies, "w") as f:
        for row in rows:
            f.write(json.dumps(dict(zip(manifest["feature_sources"], row))) + "\n")

    result = {"system": "http", "server": versions(), "workers": args.workers,
              "load_generator": subprocess.run([args.oha, "--version"], capture_output=True,
                                               text=True).stdout.strip(),
              "connections": args.connections, "cores": os.cpu_count(),
              "loadavg_at_start": os.getloadavg()}
    server = Server(args.workers, os.path.abspath(args.model), os.path.join(args.work, "gunicorn.log"))
    try:
        result["model_version"] = server.wait_ready(args.workers)
        result["parity"] = check_parity(server.url, args.model, manifest, rows)
        print(f"peer on {server.url} serves {result['model_version']}; scores equal ONNX Runtime's "
              f"(max diff {result['parity']['max_abs_diff']:g} on {result['parity']['rows']} rows)",
              file=sys.stderr)
        sampler = RssSampler(server)
        sampler.start()
        print(f"saturation: closed loop, {args.connections} connections, {args.saturation_seconds} s",
              file=sys.stderr)
        result["saturation"] = measure(args, server, sampler, bodies)
        result["phases"] = []
        for rate in (int(r) for r in args.rates.split(",")):
            print(f"rate {rate}/s for {args.seconds} s", file=sys.stderr)
            time.sleep(2)  # let the previous phase's connections close
            phase = measure(args, server, sampler, bodies, rate)
            result["phases"].append(phase)
            if phase["fell_behind"]:
                break
        result["peak_rss_mb"] = round(sampler.overall / 2**20, 1)
    finally:
        server.stop()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(table(result))
    print(f"\n{result['server']}; {args.workers} workers; {result['load_generator']}; "
          f"peak RSS {result['peak_rss_mb']} MB; written to {args.out}")


if __name__ == "__main__":
    main()
