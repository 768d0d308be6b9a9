"""Checks what can be checked of the Docker stack without a Docker engine.

- docker-compose.yml parses, has the expected services, and every file it references
  (build context, Dockerfile, bind mounts) exists; the Dockerfile's COPY sources exist;
- the scorer service can be scaled (no fixed container name, no host port);
- the topics it creates include fraudstream's default topic names;
- Prometheus scrapes the port fraudstream listens on; Grafana's provisioning files parse and
  point at the mounted dashboard folder;
- the dashboard JSON is valid, and every fraudstream metric it queries is one the scorer
  exports (given as the text of a running scorer's /metrics, --metrics FILE).

Exits 1 with one line per problem.
"""

import argparse
import json
import os
import re
import sys

import yaml

problems = []


def check(cond, message):
    if not cond:
        problems.append(message)
    return cond


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".")
    ap.add_argument("--metrics", required=True, help="a file holding a running scorer's /metrics text")
    args = ap.parse_args()
    os.chdir(args.repo)

    compose = yaml.safe_load(open("docker-compose.yml"))
    services = compose.get("services", {})
    for name in ("kafka", "topics", "fraudstream", "prometheus", "grafana"):
        check(name in services, f"docker-compose.yml: no service `{name}`")
    check(str(services["kafka"].get("image", "")).startswith("apache/kafka:"), "kafka must be the official apache/kafka image")
    check(services["kafka"]["environment"].get("KAFKA_PROCESS_ROLES") == "broker,controller", "kafka must run in KRaft mode")

    fs = services["fraudstream"]
    build = fs.get("build", {})
    context = build.get("context", ".")
    dockerfile = os.path.join(context, build.get("dockerfile", "Dockerfile"))
    check(os.path.isdir(context), f"build context {context} missing")
    if check(os.path.isfile(dockerfile), f"Dockerfile {dockerfile} missing"):
        for line in open(dockerfile):
            m = re.match(r"\s*COPY\s+(.*)", line)
            if not m or "--from=" in line:
                continue
            for src in m.group(1).split()[:-1]:
                check(os.path.exists(os.path.join(context, src)), f"{dockerfile}: COPY source {src} missing")
    check("container_name" not in fs, "fraudstream has a container_name: --scale would fail")
    check("ports" not in fs, "fraudstream publishes host ports: --scale would fail")
    check(fs.get("stop_signal", "SIGTERM") == "SIGTERM", "fraudstream must be stopped with SIGTERM")

    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            host = vol.split(":")[0]
            if host.startswith("."):
                check(os.path.exists(host), f"{name}: mounted path {host} missing")

    command = "\n".join(services["topics"].get("command", []))
    for topic in ("transactions", "navigation", "verdicts", "fraudstream-dlq", "labels", "blocklist"):
        check(re.search(rf"\b{re.escape(topic)}\b", command) is not None, f"topics service does not create `{topic}`")

    listen = fs.get("environment", {}).get("FRAUDSTREAM__METRICS__LISTEN", "")
    port = int(listen.rsplit(":", 1)[1]) if ":" in listen else None
    check(listen.startswith("0.0.0.0:"), "fraudstream must listen for metrics on 0.0.0.0 inside the container")
    prom_mount = next(v.split(":")[0] for v in services["prometheus"]["volumes"] if "prometheus.yml" in v)
    prom = yaml.safe_load(open(prom_mount))
    jobs = {j["job_name"]: j for j in prom.get("scrape_configs", [])}
    if check("fraudstream" in jobs, "prometheus.yml: no fraudstream job"):
        sd = jobs["fraudstream"].get("dns_sd_configs", [{}])[0]
        check(sd.get("port") == port, f"prometheus scrapes port {sd.get('port')}, fraudstream listens on {port}")
        check("fraudstream" in sd.get("names", []), "prometheus must discover every replica of the fraudstream service")

    graf_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    dash_dir = next(h for h, c in graf_mounts.items() if c == "/var/lib/grafana/dashboards")
    prov_dir = next(h for h, c in graf_mounts.items() if c == "/etc/grafana/provisioning")
    for sub in ("datasources", "dashboards"):
        for f in os.listdir(os.path.join(prov_dir, sub)):
            doc = yaml.safe_load(open(os.path.join(prov_dir, sub, f)))
            check(doc.get("apiVersion") == 1, f"{sub}/{f}: not a provisioning file")
            if sub == "dashboards":
                paths = [p["options"]["path"] for p in doc["providers"]]
                check("/var/lib/grafana/dashboards" in paths, f"{f}: provider path is not the mounted dashboard folder")

    exported = set(re.findall(r"^# TYPE (\S+) ", open(args.metrics).read(), re.M))
    check(len(exported) > 5, f"the metrics file lists only {len(exported)} metrics: is it a scorer's /metrics?")
    dashboards = [f for f in os.listdir(dash_dir) if f.endswith(".json")]
    check(dashboards, "no dashboard JSON")
    queried = set()
    for f in dashboards:
        try:
            dash = json.load(open(os.path.join(dash_dir, f)))
        except json.JSONDecodeError as e:
            check(False, f"{f}: invalid JSON: {e}")
            continue
        for panel in dash.get("panels", []):
            for t in panel.get("targets", []):
                for name in re.findall(r"\bfraudstream_[a-z0-9_]+", t.get("expr", "")):
                    queried.add(re.sub(r"_(bucket|sum|count)$", "", name))
    check(queried, "the dashboard queries no fraudstream metric")
    for name in sorted(queried - exported):
        check(False, f"dashboard queries `{name}`, which the scorer does not export")

    for p in problems:
        print(f"problem: {p}")
    print(f"{len(queried)} dashboard metrics checked against {len(exported)} exported; {len(problems)} problem(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
