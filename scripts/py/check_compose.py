"""Checks what can be checked of the Docker stack without a Docker engine.

- docker-compose.yml parses, has the expected services, and every file it references
  (build context, Dockerfile, bind mounts) exists; the Dockerfile's COPY sources exist;
- every apache/kafka image is the release scripts/kafka/pom.xml pins (kafka.version);
- the Dockerfile's build stage installs each Debian package scripts/setup installs for the
  build, copies what the crate build reads (Cargo.toml, Cargo.lock, the built targets'
  folders, the files they include_str!) before building, and gives every other target
  Cargo.toml names a copy or a stub; its runtime stage installs the shared libraries;
- the replay service runs a script and a sample that exist (through its mounts), into a topic
  the topics service creates, once the topics exist;
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
import tomllib

import yaml

problems = []

# Packages scripts/setup installs that the image build does not need: the openssl tool (TLS
# test), kcat (the README's quickstart), and Java and Maven (the Apache Kafka of the tests
# and scripts/broker).
NOT_FOR_BUILD = re.compile(r"^(openssl|kcat|maven)$|jdk|jre")
# Shared libraries the scorer loads at run time: librdkafka's OpenSSL, the C++ runtime of
# RocksDB and ONNX Runtime, the CA certificates of TLS listeners.
RUNTIME_PACKAGES = ("libssl3", "libstdc++6", "ca-certificates")


def check(cond, message):
    if not cond:
        problems.append(message)
    return cond


def dockerfile_stages(path):
    """The Dockerfile as stages, each a list of (instruction, arguments) with continuation
    lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", open(path).read())
    stages = []
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z]+)\s+(.*)", line)
        if not m or line.lstrip().startswith("#"):
            continue
        op, rest = m.group(1).upper(), m.group(2)
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op, rest))
    return stages


def copy_sources(rest):
    """The context paths of a COPY's arguments (none for COPY --from=)."""
    if "--from=" in rest:
        return []
    args = [a for a in rest.split() if not a.startswith("--")]
    if args and args[0].startswith("["):
        args = json.loads(" ".join(args))
    return [os.path.normpath(a) for a in args[:-1]]


def apt_packages(stage):
    found = set()
    for op, rest in stage:
        if op == "RUN":
            for m in re.finditer(r"apt-get\s+install\s+([^&;|]*)", rest):
                found |= {a for a in m.group(1).split() if not a.startswith("-")}
    return found


def setup_build_packages():
    """The Debian packages scripts/setup installs, less what only the tests use. Read with
    regexes over `dpkg -s PKG` and `missing+=(PKG…)`, whatever the lines around them."""
    text = open("scripts/setup").read()
    names = set(re.findall(r"dpkg\s+-s\s+([A-Za-z0-9.+-]+)", text))
    for m in re.finditer(r"missing\+=\(([^)]*)\)", text):
        names |= {n.strip("\"'") for n in m.group(1).split()}
    return {n for n in names if n and "$" not in n and not NOT_FOR_BUILD.search(n)}


def cargo_targets():
    """{path: kind} of every target Cargo.toml names (explicit paths, else Cargo's defaults);
    the bins as {name: path}."""
    manifest = tomllib.load(open("Cargo.toml", "rb"))
    package = manifest.get("package", {}).get("name", "")
    targets, bins = {}, {}
    if "lib" in manifest or os.path.exists("src/lib.rs"):
        targets[manifest.get("lib", {}).get("path", "src/lib.rs")] = "lib"
    for b in manifest.get("bin", []) or ([{"name": package}] if os.path.exists("src/main.rs") else []):
        default = "src/main.rs" if b["name"] == package else f"src/bin/{b['name']}.rs"
        bins[b["name"]] = b.get("path", default)
        targets[bins[b["name"]]] = "bin"
    for kind, folder in (("bench", "benches"), ("test", "tests"), ("example", "examples")):
        for t in manifest.get(kind, []):
            targets[t.get("path", f"{folder}/{t['name']}.rs")] = kind
    return {os.path.normpath(p): k for p, k in targets.items()}, bins


def check_dockerfile(dockerfile):
    stages = dockerfile_stages(dockerfile)
    builds = [i for i, st in enumerate(stages) if any(op == "RUN" and "cargo build" in r for op, r in st)]
    if not check(builds, f"{dockerfile}: no stage runs `cargo build`"):
        return
    build = stages[builds[0]]
    installed = apt_packages(build)
    wanted = setup_build_packages()
    check(wanted, "scripts/setup: no build package found (`dpkg -s PKG`, `missing+=(PKG)`): has its format changed?")
    for pkg in sorted(wanted - installed):
        check(False, f"{dockerfile}: the build stage does not install `{pkg}`, which scripts/setup installs for the build")
    runtime = apt_packages(stages[-1])
    for pkg in RUNTIME_PACKAGES:
        check(pkg in runtime, f"{dockerfile}: the runtime stage does not install `{pkg}`")

    # Where each path arrives in the build stage (instruction index), and where cargo runs.
    copied = [(i, src) for i, (op, r) in enumerate(build) if op in ("COPY", "ADD") for src in copy_sources(r)]
    runs = [(i, r) for i, (op, r) in enumerate(build) if op == "RUN"]
    cargo_runs = [(i, r) for i, r in runs if "cargo build" in r]
    last_build = cargo_runs[-1][0]
    check(all("--locked" in r for _, r in cargo_runs), f"{dockerfile}: `cargo build` without --locked")
    # A RUN that writes (`> "$p"`) a stub for every `path = "…"` line of Cargo.toml.
    stubs = [i for i, r in runs if "Cargo.toml" in r and re.search(r"\^path", r) and re.search(r'>\s*"?\$', r)]

    def arrival(path):
        hits = [i for i, src in copied if src == "." or path == src or path.startswith(src + "/")]
        return min(hits) if hits else None

    targets, bins = cargo_targets()
    built = {p for p, k in targets.items() if k == "lib"}
    chosen = re.findall(r"--bin[ =](\S+)", cargo_runs[-1][1])
    built |= {bins[b] for b in chosen if b in bins} if chosen else set(bins.values())
    for b in chosen:
        check(b in bins, f"{dockerfile}: builds `--bin {b}`, which Cargo.toml does not name")
    needed = {"Cargo.toml", "Cargo.lock"} | built
    for root, _, files in os.walk("src"):
        for f in files:
            if f.endswith(".rs"):
                for rel in re.findall(r"include_(?:str|bytes)!\(\s*\"([^\"]+)\"", open(os.path.join(root, f)).read()):
                    needed.add(os.path.normpath(os.path.join(root, rel)))
    for path in sorted(needed):
        at = arrival(path)
        if check(at is not None, f"{dockerfile}: the build stage does not copy `{path}`, which the crate build reads"):
            check(at < last_build, f"{dockerfile}: `{path}` is copied after the last `cargo build`")
            if path not in ("Cargo.toml", "Cargo.lock"):
                check(all(s < at for s in stubs), f"{dockerfile}: the stubs are written after `{path}` is copied, over it")
    for path in sorted(set(targets) - built):
        check(arrival(path) is not None or any(s < last_build for s in stubs),
              f"{dockerfile}: Cargo.toml's target `{path}` is neither copied nor stubbed: cargo cannot load the manifest")


def check_kafka_version(services):
    m = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", open("scripts/kafka/pom.xml").read())
    if not check(m, "scripts/kafka/pom.xml: no <kafka.version>"):
        return
    for name, svc in services.items():
        image = str(svc.get("image", ""))
        if image.startswith("apache/kafka:"):
            tag = image.split(":", 1)[1]
            check(tag == m.group(1), f"{name}: image {image}, but scripts/kafka/pom.xml pins Kafka {m.group(1)}")


def check_replay(services, created):
    replay = services.get("replay")
    if not check(replay is not None, "docker-compose.yml: no service `replay`"):
        return
    words = []
    for key in ("entrypoint", "command"):  # each a list or a string
        value = replay.get(key) or []
        words += value if isinstance(value, list) else [value]
    command = " ".join(map(str, words))
    mounts = [v.split(":")[:2] for v in replay.get("volumes", [])]

    def on_host(path):
        for host, inside in mounts:
            if path == inside or path.startswith(inside.rstrip("/") + "/"):
                return os.path.normpath(host + path[len(inside.rstrip("/")):])
        return None

    for what, pattern in (("script", r"python3?\s+(\S+\.py)"), ("sample", r"--sample[ =](\S+)")):
        m = re.search(pattern, command)
        if check(m, f"replay: no {what} in its command"):
            host = on_host(m.group(1))
            check(host and os.path.isfile(host), f"replay: {what} {m.group(1)} is no file mounted from the repository")
    m = re.search(r"--topic[ =](\S+)", command)
    check(m and m.group(1) in created, "replay: its --topic is not one the topics service creates")
    m = re.search(r"--bootstrap[ =]([^:\s]+)", command)
    check(m and m.group(1) in services, "replay: --bootstrap is not a service of the compose file")
    depends = replay.get("depends_on") or {}
    cond = depends.get("topics") if isinstance(depends, dict) else None
    check(isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully",
          "replay must wait for the topics service to complete")


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

    check_kafka_version(services)

    fs = services["fraudstream"]
    build = fs.get("build", {})
    context = build.get("context", ".")
    dockerfile = os.path.join(context, build.get("dockerfile", "Dockerfile"))
    check(os.path.isdir(context), f"build context {context} missing")
    if check(os.path.isfile(dockerfile), f"Dockerfile {dockerfile} missing"):
        for stage in dockerfile_stages(dockerfile):
            for op, rest in stage:
                for src in copy_sources(rest) if op in ("COPY", "ADD") else []:
                    check(os.path.exists(os.path.join(context, src)), f"{dockerfile}: COPY source {src} missing")
        if check(os.path.normpath(context) == ".", "the build context must be the repository root (these checks assume it)"):
            check_dockerfile(dockerfile)
    check("container_name" not in fs, "fraudstream has a container_name: --scale would fail")
    check("ports" not in fs, "fraudstream publishes host ports: --scale would fail")
    check(fs.get("stop_signal", "SIGTERM") == "SIGTERM", "fraudstream must be stopped with SIGTERM")

    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            host = vol.split(":")[0]
            if host.startswith("."):
                check(os.path.exists(host), f"{name}: mounted path {host} missing")

    command = "\n".join(services["topics"].get("command", []))
    created = set()
    for topic in ("transactions", "navigation", "verdicts", "fraudstream-dlq", "labels", "blocklist"):
        if check(re.search(rf"\b{re.escape(topic)}\b", command) is not None, f"topics service does not create `{topic}`"):
            created.add(topic)
    check_replay(services, created)

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
