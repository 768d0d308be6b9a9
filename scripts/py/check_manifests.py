"""Checks the Kubernetes manifests of deploy/kubernetes without a cluster and without a network.

- every document of every .yaml file there validates against the Kubernetes API schema of
  KUBERNETES_VERSION, strictly: an unknown field is an error (kubernetes-validate, which
  carries the schemas);
- the KEDA ScaledObject validates, as strictly, against KEDA's ScaledObject model
  (cloudcoil-models-keda, which carries it); any other kind without a schema is a problem;
- kustomization.yaml lists every manifest but secret.example.yaml (no key is applied from
  the repository), and only files that exist;
- the ConfigMap's fraudstream.toml parses, and each of its tables and keys is one
  docs/fraudstream.toml sets or shows commented out, as does each FRAUDSTREAM__* variable
  (a cheap catch of typos: `fraudstream check-config` is the real check of a configuration);
  the model and rules files it names are shipped in the image;
- the StatefulSet: startup and liveness probes on /healthz, readiness on /readyz, all on the
  port fraudstream listens on (not a loopback address); terminationGracePeriodSeconds of at
  least 30 s; the image's user, not root; the --config file, the state directory and the HMAC
  key file where the ConfigMap, the volume claim and the Secret are mounted;
- the Services and the PodDisruptionBudget select its pods, and Prometheus is pointed at
  the metrics port;
- the ScaledObject scales that StatefulSet on the lag of the configured group, topic and
  brokers, with maxReplicaCount set (the transactions topic's partition count) and no idle
  consumers allowed, and the StatefulSet leaves `replicas` to it.

The manifests are only checked here, not applied to a cluster. Prints one line per problem
and exits 1 if there is any.
"""

import argparse
import glob
import os
import re
import sys
import tomllib
from importlib.metadata import version

import jsonschema
import kubernetes_validate
import yaml

# The Kubernetes release the manifests are validated against. They use only stable (v1)
# APIs, which later releases keep.
KUBERNETES_VERSION = "1.32.0"
DIR = "deploy/kubernetes"
# Not applied by kustomization.yaml: it holds a placeholder, never a key.
EXAMPLES = {"secret.example.yaml"}
# Tables of docs/fraudstream.toml whose keys are not fraudstream's own but passed through
# (librdkafka properties) or data (schema ids): any key goes there.
OPEN_TABLES = ("kafka", "kafka-consumer", "kafka-producer", "input.schema-ids")
ENV_PREFIX = "FRAUDSTREAM__"

problems = []


def check(cond, message):
    if not cond:
        problems.append(message)
    return cond


def name_of(doc):
    return f"{doc.get('kind')} {(doc.get('metadata') or {}).get('name')}"


def strict(schema):
    """The JSON schema of a pydantic model, in place, refusing properties it does not name
    (as the API server's strict field validation does). An optional field is the field's
    schema, not "that or null": the manifests leave out what they do not set, and an error
    then names the field's type."""
    if isinstance(schema, dict):
        options = schema.get("anyOf", [])
        if len(options) == 2 and {"type": "null"} in options:
            del schema["anyOf"]
            schema.update(next(o for o in options if o != {"type": "null"}))
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
        for key in ("properties", "$defs"):
            for sub in schema.get(key, {}).values():
                strict(sub)
        for key in ("items", "additionalProperties"):
            strict(schema.get(key))
        for key in ("anyOf", "allOf", "oneOf"):
            for sub in schema.get(key, []):
                strict(sub)
    return schema


def keda_validator():
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    schema = strict(ScaledObject.model_json_schema(by_alias=True))
    return jsonschema.Draft202012Validator(schema)


def at(path, message):
    path = ".".join(map(str, path))
    return f"{path}: {message}" if path else message


def schema_problems(doc, keda, kubernetes_version):
    """What the API server would refuse in a resource: every problem for a ScaledObject, the
    first for the others (kubernetes-validate stops there)."""
    if doc["kind"] == "ScaledObject" and doc["apiVersion"] == "keda.sh/v1alpha1":
        errors = sorted(keda.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        return [at(e.absolute_path, e.message) for e in errors]
    try:
        kubernetes_validate.validate(doc, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [at(e.path, e.message)]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def documented():
    """The tables and the dotted keys docs/fraudstream.toml sets or shows commented out."""
    tables, keys, table = {""}, set(), ""
    for line in open("docs/fraudstream.toml"):
        line = line.strip()
        m = re.fullmatch(r"\[([a-z0-9.-]+)\]", line)
        if m:
            table = m.group(1)
            tables.add(table)
            continue
        m = re.match(r'#?\s?([a-z][a-z0-9-]*|"[^"]+")\s*=\s*\S', line)
        if m:
            keys.add(f"{table}.{m.group(1)}".lstrip("."))
    return tables, keys


def is_open(path):
    return any(path == t or path.startswith(t + ".") for t in OPEN_TABLES)


def check_toml_keys(where, table, tables, keys, prefix=""):
    for key, value in table.items():
        path = f"{prefix}{key}"
        if is_open(path):
            continue
        if isinstance(value, dict) and path in tables:
            check_toml_keys(where, value, tables, keys, path + ".")
        else:
            check(path in keys, f"{where}: key `{path}` is not in docs/fraudstream.toml")


def env_key(var):
    """The configuration key a FRAUDSTREAM__* variable sets (docs/configuration.md)."""
    return ".".join(p.lower().replace("_", "-") for p in var[len(ENV_PREFIX):].split("__"))


def env_value(text):
    """A variable's value as fraudstream reads it: TOML when it parses as a TOML value, else
    text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def lookup(table, path):
    for part in path.split("."):
        if not isinstance(table, dict) or part not in table:
            return None
        table = table[part]
    return table


def image_paths(dockerfile):
    """The runtime stage's COPY lines from the build context as (destination, source), its
    WORKDIR, USER and ORT_DYLIB_PATH."""
    text = re.sub(r"\\\n", " ", open(dockerfile).read())
    runtime = text.split("\nFROM ")[-1]
    copies = [(m.group(2), m.group(1)) for m in re.finditer(r"^COPY\s+(?!--)(\S+)\s+(\S+)\s*$", runtime, re.M)]
    workdir = re.search(r"^WORKDIR\s+(\S+)", runtime, re.M)
    user = re.search(r"^USER\s+(\d+)", runtime, re.M)
    ort = re.search(r"ORT_DYLIB_PATH=(\S+)", runtime)
    return copies, workdir and workdir.group(1), user and int(user.group(1)), ort and ort.group(1)


def in_image(path, copies):
    """The repository file an absolute path of the image comes from, if a COPY puts it there."""
    for dest, src in copies:
        if path == dest or path.startswith(dest.rstrip("/") + "/"):
            return os.path.normpath(src + path[len(dest.rstrip("/")):])
    return None


def mount_of(container, volume):
    return next((m["mountPath"] for m in container.get("volumeMounts", []) if m.get("name") == volume), None)


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_statefulset(sts, docs, invalid, config, image):
    where = f"StatefulSet {sts['metadata']['name']}"
    copies, workdir, user, ort = image
    pod = sts["spec"]["template"]["spec"]
    containers = pod.get("containers", [])
    c = next((c for c in containers if "fraudstream" in c.get("image", "")), None)
    if not check(c is not None, f"{where}: no container runs the fraudstream image"):
        return None
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    for var in env:
        if var.startswith(ENV_PREFIX):
            key = env_key(var)
            check(is_open(key) or key in config["keys"], f"{where}: {var} sets `{key}`, which is not in docs/fraudstream.toml")

    def setting(key, default=True):
        """The value fraudstream runs with: the variable's, else the ConfigMap file's, else
        (with `default`) docs/fraudstream.toml's, which is the built-in default for the keys
        asked so."""
        var = ENV_PREFIX + key.upper().replace(".", "__").replace("-", "_")
        if env.get(var) is not None:
            return env_value(env[var])
        value = lookup(config["toml"], key)
        return lookup(config["defaults"], key) if value is None and default else value

    # The metrics port: what fraudstream listens on, what the probes and Prometheus ask.
    listen = str(setting("metrics.listen"))
    host, _, port = listen.rpartition(":")
    port = int(port) if port.isdigit() else None
    check(host not in ("127.0.0.1", "localhost", "[::1]"), f"{where}: metrics.listen {listen} is not reachable by the kubelet's probes")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    check(port in ports.values(), f"{where}: no container port is {port}, the port of metrics.listen {listen}")
    probes = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in probes.items():
        get = (c.get(probe) or {}).get("httpGet")
        if check(get, f"{where}: no {probe} with httpGet"):
            check(get.get("path") == path, f"{where}: {probe} asks {get.get('path')}, not {path}")
            target = ports.get(get.get("port"), get.get("port"))
            check(target == port, f"{where}: {probe} asks port {get.get('port')}, not the metrics port {port}")

    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(grace >= 30, f"{where}: terminationGracePeriodSeconds {grace} < 30 leaves no time to drain")
    sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    check(sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true")
    check(sc.get("runAsUser") == user, f"{where}: runAsUser {sc.get('runAsUser')} is not the image's USER {user}")
    check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem is not true")
    check(env.get("ORT_DYLIB_PATH") in (None, ort), f"{where}: ORT_DYLIB_PATH is not the image's {ort}")

    # Where the configuration says its files are, and what is mounted there.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    words = (c.get("command") or []) + (c.get("args") or [])
    cfg = words[words.index("--config") + 1] if "--config" in words[:-1] else None
    if check(cfg, f"{where}: fraudstream is not run with --config"):
        mounted = [(mount_of(c, n), v["configMap"]) for n, v in volumes.items() if "configMap" in v]
        check(any(m and os.path.join(m, "") == os.path.dirname(cfg) + "/" and cm.get("name") == config["name"]
                  and os.path.basename(cfg) in config["data"] for m, cm in mounted),
              f"{where}: --config {cfg} is not the ConfigMap {config['name']}'s file, mounted")
    state = str(setting("state.path"))
    claims = [t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])]
    check(any(mount_of(c, n) == state for n in claims), f"{where}: state.path {state} is not a volume claim's mount")
    secret = setting("state.hmac-secret")
    if check(isinstance(secret, dict) and isinstance(secret.get("file"), str),
             f"{where}: state.hmac-secret is not read from a file (a mounted Secret); without it a development key is used"):
        path = secret["file"]
        found = False
        for n, v in volumes.items():
            m = mount_of(c, n)
            if "secret" in v and m and os.path.dirname(path) == m.rstrip("/"):
                items = v["secret"].get("items")
                found = os.path.basename(path) in ([i["path"] for i in items] if items else [os.path.basename(path)])
        check(found, f"{where}: state.hmac-secret's file {path} is not a key of a mounted Secret")
    for key, default in (("model.manifest", True), ("model.shadow", False), ("decision.rules", False)):
        path = setting(key, default)
        if isinstance(path, str):
            src = in_image(path if os.path.isabs(path) else os.path.join(workdir or "/", path), copies)
            check(src and os.path.isfile(src), f"{where}: {key} {path} is not a file the image is built with")

    labels = sts["spec"]["template"]["metadata"].get("labels", {})
    check(selects(sts["spec"]["selector"].get("matchLabels"), labels), f"{where}: its selector does not select its pods")
    for doc in docs:
        kind, spec = doc.get("kind"), doc.get("spec") or {}
        if kind == "Service":
            check(selects(spec.get("selector"), labels), f"{name_of(doc)}: does not select the StatefulSet's pods")
            for p in spec.get("ports", []):
                target = ports.get(p.get("targetPort"), p.get("targetPort", p.get("port")))
                check(target == port, f"{name_of(doc)}: port {p.get('port')} is not the metrics port {port}")
            scrape = (doc["metadata"].get("annotations") or {}).get("prometheus.io/port")
            check(scrape in (None, str(port)), f"{name_of(doc)}: prometheus.io/port {scrape} is not the metrics port {port}")
        if kind == "PodDisruptionBudget":
            check(selects(spec.get("selector", {}).get("matchLabels"), labels), f"{name_of(doc)}: does not select the StatefulSet's pods")
    headless = {d["metadata"]["name"] for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"}
    check("Service" in invalid or sts["spec"]["serviceName"] in headless,
          f"{where}: serviceName {sts['spec']['serviceName']} is no headless Service here")
    return setting


def check_scaledobject(so, sts, setting):
    where = name_of(so)
    spec = so["spec"]
    target = spec.get("scaleTargetRef", {})
    check(target.get("kind") == "StatefulSet" and target.get("name") == sts["metadata"]["name"],
          f"{where}: does not scale StatefulSet {sts['metadata']['name']}")
    check("replicas" not in sts["spec"], f"{where}: StatefulSet {sts['metadata']['name']} sets replicas, which each apply resets under the autoscaler")
    top = spec.get("maxReplicaCount")
    if check(isinstance(top, int), f"{where}: no maxReplicaCount (the transactions topic's partition count)"):
        check(spec.get("minReplicaCount", 0) <= top, f"{where}: minReplicaCount above maxReplicaCount")
    kafka = [t for t in spec.get("triggers", []) if t.get("type") == "kafka"]
    if not check(kafka, f"{where}: no kafka trigger"):
        return
    for t in kafka:
        meta = t.get("metadata", {})
        for field, key in (("consumerGroup", "group-id"), ("topic", "topics.transactions"), ("bootstrapServers", "brokers")):
            check(meta.get(field) == setting(key), f"{where}: {field} {meta.get(field)!r} is not fraudstream's {key} {setting(key)!r}")
        check(str(meta.get("allowIdleConsumers", "false")).lower() == "false",
              f"{where}: allowIdleConsumers lets it scale past the partition count; those instances sit idle")


def check_together(folder, docs, invalid):
    """The project's checks across the resources that match their schema; a kind of which
    one does not is left out (its problem is already told)."""
    defaults = tomllib.load(open("docs/fraudstream.toml", "rb"))
    tables, keys = documented()
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "fraudstream.toml" in (d.get("data") or {})]
    config = None
    if "ConfigMap" not in invalid and check(len(maps) == 1, f"{folder}: {len(maps)} ConfigMaps hold a fraudstream.toml, not one"):
        where = f"{name_of(maps[0])}: fraudstream.toml"
        try:
            toml = tomllib.loads(maps[0]["data"]["fraudstream.toml"])
            check_toml_keys(where, toml, tables, keys)
            config = {"name": maps[0]["metadata"]["name"], "data": maps[0]["data"], "toml": toml,
                      "defaults": defaults, "keys": keys}
        except tomllib.TOMLDecodeError as e:
            check(False, f"{where}: not TOML: {e}")

    sets = [d for d in docs if d["kind"] == "StatefulSet"]
    if "StatefulSet" in invalid or not check(len(sets) == 1, f"{folder}: {len(sets)} StatefulSets, not one") or not config:
        return
    setting = check_statefulset(sets[0], docs, invalid, config, image_paths("scripts/docker/Dockerfile"))
    if setting:
        for so in (d for d in docs if d["kind"] == "ScaledObject"):
            check_scaledobject(so, sets[0], setting)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".")
    ap.add_argument("--dir", default=DIR, help=f"the manifests' folder (default {DIR})")
    ap.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = ap.parse_args()
    os.chdir(args.repo)

    keda = keda_validator()
    files = sorted(glob.glob(os.path.join(args.dir, "*.yaml")) + glob.glob(os.path.join(args.dir, "*.yml")))
    # The resources to apply that match their schema, and the kinds of those that do not.
    docs, invalid, applied, kustomization = [], set(), 0, None
    for f in files:
        try:
            loaded = [d for d in yaml.safe_load_all(open(f)) if d is not None]
        except yaml.YAMLError as e:
            check(False, f"{f}: not YAML: {' '.join(str(e).split())}")
            invalid.add("*")
            continue
        for doc in loaded:
            if not check(isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc, f"{f}: a document without apiVersion and kind"):
                continue
            if doc["kind"] == "Kustomization":
                kustomization = (f, doc)
                continue
            found = [f"{f}: {name_of(doc)}: {p}" for p in schema_problems(doc, keda, args.kubernetes_version)]
            problems.extend(found)
            if os.path.basename(f) not in EXAMPLES:
                applied += 1
                if found:
                    invalid.add(doc["kind"])
                else:
                    docs.append(doc)

    manifests = {os.path.basename(f) for f in files} - EXAMPLES
    if check(kustomization, f"{args.dir}: no kustomization.yaml"):
        f, k = kustomization
        listed = [r for r in k.get("resources") or [] if isinstance(r, str)]
        for r in listed:
            check(os.path.isfile(os.path.join(args.dir, r)), f"{f}: lists {r}, which does not exist")
            check(r not in EXAMPLES, f"{f}: lists {r}, an example that must not be applied")
        for m in sorted(manifests - {os.path.basename(f)} - set(listed)):
            check(False, f"{f}: does not list {m}")

    # After a file that does not parse, what the manifests hold together is unknown.
    if "*" not in invalid:
        check_together(args.dir, docs, invalid)

    for p in problems:
        print(f"problem: {p}")
    print(f"{len(files)} files ({applied} resources to apply) checked against Kubernetes {args.kubernetes_version} "
          f"and cloudcoil-models-keda {version('cloudcoil-models-keda')}; {len(problems)} problem(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
