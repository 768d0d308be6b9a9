//! The integration-test harness: a real broker (from `scripts/test`), random topic and group
//! names so tests never collide, the real `fraudstream` binary as a child process, and a
//! reader that collects what it produced.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

pub fn brokers() -> String {
    std::env::var("FRAUDSTREAM_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn repo() -> PathBuf {
    // Cargo sets it at run time too; the compiled-in path is stale when one target directory
    // serves several clones (a binary is fresh by its sources' times, not by their place).
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Topic names for one test: inputs, global tables, verdicts, dead letters.
pub struct Topics {
    pub transactions: String,
    pub navigation: String,
    pub labels: String,
    pub blocklist: String,
    pub verdicts: String,
    pub dead_letter: String,
    pub group: String,
}

/// Creates fresh topics (`partitions` for the inputs, 3 for verdicts, 1 for dead letters and
/// each global table). The scorer creates its changelog and repartition topics itself.
pub async fn topics(test: &str, partitions: i32) -> Topics {
    let t = Topics {
        transactions: unique(&format!("{test}-tx")),
        navigation: unique(&format!("{test}-nav")),
        labels: unique(&format!("{test}-labels")),
        blocklist: unique(&format!("{test}-blocklist")),
        verdicts: unique(&format!("{test}-verdicts")),
        dead_letter: unique(&format!("{test}-dlq")),
        group: unique(&format!("{test}-group")),
    };
    create_topics(&[
        (&t.transactions, partitions),
        (&t.navigation, partitions),
        (&t.labels, 1),
        (&t.blocklist, 1),
        (&t.verdicts, 3),
        (&t.dead_letter, 1),
    ])
    .await;
    t
}

/// Creates topics with the given partition counts.
pub async fn create_topics(topics: &[(&str, i32)]) {
    let plain: Vec<NewTopicSpec> = topics.iter().map(|(n, p)| (*n, *p, &[][..])).collect();
    create_topics_with(&plain).await;
}

/// Compaction that a test can watch happen: segments roll every 100 ms and the cleaner
/// takes any of them (the test broker's cleaner looks every second).
pub const COMPACT_SOON: &[(&str, &str)] = &[
    ("cleanup.policy", "compact"),
    ("segment.ms", "100"),
    ("min.cleanable.dirty.ratio", "0.001"),
    ("delete.retention.ms", "100"),
];

/// A topic to create: name, partitions, topic configs.
pub type NewTopicSpec<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);

/// Creates topics with partition counts and topic configs.
pub async fn create_topics_with(topics: &[NewTopicSpec<'_>]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, p, config)| {
            config.iter().fold(
                NewTopic::new(name, *p, TopicReplication::Fixed(1)),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = tokio::time::timeout(Duration::from_secs(20), admin.create_topics(&new, &opts))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "broker at {} did not answer; run the tests with scripts/test, which starts it",
                brokers()
            )
        })
        .expect("create topics");
    for r in results {
        r.expect("topic created");
    }
    // The controller has the topics; wait until the broker's metadata has them too, or a
    // client started next may be told they do not exist.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for (name, partitions, _) in topics {
        loop {
            let known = admin
                .inner()
                .fetch_metadata(Some(name), Duration::from_secs(5))
                .ok()
                .and_then(|md| {
                    md.topics()
                        .iter()
                        .find(|t| t.name() == *name && t.error().is_none())
                        .map(|t| t.partitions().len() as i32)
                });
            if known == Some(*partitions) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "topic {name} not in the broker's metadata after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sets a topic's configs to exactly `config` (what is not given returns to the default).
pub async fn set_topic_config(topic: &str, config: &[(&str, &str)]) {
    use rdkafka::admin::{AlterConfig, ResourceSpecifier};
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let alter = config.iter().fold(
        AlterConfig::new(ResourceSpecifier::Topic(topic)),
        |a, (k, v)| a.set(k, v),
    );
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin
        .alter_configs(&[alter], &opts)
        .await
        .expect("alter configs")
    {
        r.expect("topic config altered");
    }
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        // As the Java client: the scorer's repartition stage re-keys with murmur2 too.
        .set("partitioner", "murmur2_random")
        // Tests compare with an order they produced: a retried batch must not land behind
        // later ones, nor twice (librdkafka's default retries without sequence numbers).
        .set("enable.idempotence", "true")
        .create()
        .expect("producer")
}

/// Produces and waits for the acknowledgement; returns (partition, offset).
pub async fn send(
    p: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> (i32, i64) {
    let mut r = FutureRecord::<[u8], [u8]>::to(topic);
    if let Some(k) = key {
        r = r.key(k);
    }
    if let Some(v) = value {
        r = r.payload(v);
    }
    let d = p
        .send(r, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
    (d.partition, d.offset)
}

/// A producer as upstream systems that write in Kafka transactions use it.
pub fn transactional_producer() -> FutureProducer {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", unique("upstream"))
        .set("partitioner", "murmur2_random")
        .create()
        .expect("transactional producer");
    p.init_transactions(Duration::from_secs(30))
        .expect("init_transactions");
    p
}

/// Produces `records` (topic, key, value) in one transaction, then commits or aborts it.
pub async fn send_in_transaction(
    p: &FutureProducer,
    records: &[(&str, &str, Option<String>)],
    commit: bool,
) {
    p.begin_transaction().expect("begin_transaction");
    for (topic, key, value) in records {
        send(
            p,
            topic,
            Some(key.as_bytes()),
            value.as_deref().map(str::as_bytes),
        )
        .await;
    }
    if commit {
        p.commit_transaction(Duration::from_secs(30))
            .expect("commit");
    } else {
        p.abort_transaction(Duration::from_secs(30)).expect("abort");
    }
}

/// Every record of a topic now, from the start of each partition to its end, read
/// `read_uncommitted` (what the log holds, compacted or not).
pub fn read_all(topic: &str) -> Vec<OwnedMessage> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::{Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("read-all"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()
        .expect("consumer");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in md.topics()[0].partitions() {
        let (low, high) = c
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .expect("watermarks");
        if high > low {
            ends.insert(p.id(), high);
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))
                .unwrap();
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    c.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        assert!(
            Instant::now() < deadline,
            "cannot read `{topic}` to its end"
        );
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if ends
                    .get(&m.partition())
                    .is_some_and(|e| m.offset() + 1 >= *e)
                {
                    ends.remove(&m.partition());
                }
                out.push(m.detach());
            }
            Some(Err(e)) => panic!("reading `{topic}`: {e}"),
            None => {
                // The rest of a partition may have been compacted away: its position tells.
                ends.retain(|p, end| {
                    fraudstream::source::position(&c, topic, *p).is_none_or(|pos| pos < *end)
                });
            }
        }
    }
    out
}

/// Produces many records without waiting for each acknowledgement in turn.
pub async fn send_all(p: &FutureProducer, topic: &str, records: &[(String, Vec<u8>)]) {
    send_all_to(p, topic, None, records).await
}

/// [`send_all`] to one `partition` (`None`: by key).
pub async fn send_all_to(
    p: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    records: &[(String, Vec<u8>)],
) {
    let mut futures = Vec::with_capacity(records.len());
    for (k, v) in records {
        let mut r = FutureRecord::to(topic)
            .key(k.as_bytes())
            .payload(v.as_slice());
        if let Some(partition) = partition {
            r = r.partition(partition);
        }
        loop {
            match p.send_result(r) {
                Ok(f) => {
                    futures.push(f);
                    break;
                }
                Err((_, back)) => {
                    r = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    // Each partition holds its records in the order sent: a test's expectations follow it.
    let mut last: std::collections::HashMap<i32, i64> = Default::default();
    for (i, f) in futures.into_iter().enumerate() {
        let d = f.await.expect("delivery").map_err(|(e, _)| e).expect("ack");
        let before = last.insert(d.partition, d.offset);
        assert!(
            before.is_none_or(|b| b < d.offset),
            "record {i} landed at offset {} of partition {}, behind {before:?}",
            d.offset,
            d.partition
        );
    }
}

/// An Apache Kafka broker of a test's own (`scripts/broker` on free ports), for a test that
/// needs another listener; stopped when dropped.
pub struct LocalBroker {
    pub port: u16,
    pub dir: PathBuf,
}

impl LocalBroker {
    /// A broker whose client listener is TLS-only (PEM certificate and key).
    pub fn start_tls(dir: &Path, cert: &Path, key: &Path) -> LocalBroker {
        LocalBroker::launch(
            dir,
            &["--tls", cert.to_str().unwrap(), key.to_str().unwrap()],
        )
    }

    fn launch(dir: &Path, extra: &[&str]) -> LocalBroker {
        let b = LocalBroker {
            // The controller takes port + 1, a TLS broker's internal listener port + 2.
            port: free_ports(3),
            dir: dir.join("broker"),
        };
        b.script("start", extra);
        b
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn script(&self, command: &str, extra: &[&str]) {
        let out = Command::new(repo().join("scripts/broker"))
            .arg(command)
            .args(["--port", &self.port.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .args(extra)
            .output()
            .expect("scripts/broker");
        assert!(
            out.status.success(),
            "scripts/broker {command} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/broker"))
            .args(["stop", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .output();
    }
}

/// The first of `n` consecutive ports that are all free now.
pub fn free_ports(n: u16) -> u16 {
    loop {
        let port = free_port();
        if port.checked_add(n).is_none() {
            continue;
        }
        if (1..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", port + i)).is_ok()) {
            return port;
        }
    }
}

/// Reads a topic from the beginning with its own group.
pub struct Reader {
    consumer: StreamConsumer,
    pub messages: Vec<OwnedMessage>,
}

impl Reader {
    pub fn new(topic: &str) -> Reader {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader");
        consumer.subscribe(&[topic]).expect("subscribe");
        Reader {
            consumer,
            messages: Vec::new(),
        }
    }

    /// Reads until `done(messages)` holds or `timeout` passes; returns whether it held.
    pub async fn read_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[OwnedMessage]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(&self.messages) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match tokio::time::timeout(left.min(Duration::from_millis(500)), self.consumer.recv())
                .await
            {
                Ok(Ok(m)) => self.messages.push(m.detach()),
                Ok(Err(e)) => panic!("reader error: {e}"),
                Err(_) => {}
            }
        }
        true
    }

    /// Reads until `n` distinct keys have been seen or `timeout` passes.
    pub async fn read_until_distinct_keys(&mut self, timeout: Duration, n: usize) -> bool {
        let mut keys = std::collections::HashSet::new();
        let mut counted = 0;
        self.read_until(timeout, |m| {
            for msg in &m[counted..] {
                keys.insert(msg.key().map(<[u8]>::to_vec));
            }
            counted = m.len();
            keys.len() >= n
        })
        .await
    }

    /// Reads for `quiet` more time, for messages that should not come.
    pub async fn drain_for(&mut self, quiet: Duration) {
        let _ = self.read_until(quiet, |_| false).await;
    }
}

/// The value of header `name`, as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The admin token every test scorer is given (`metrics.admin-token`).
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The HMAC key every test scorer is given (`state.hmac-secret`).
pub const HMAC_SECRET: &str = "test-hmac-secret-0123456789abcdef";

/// A `fraudstream run` child process.
pub struct Scorer {
    child: Child,
    pub log: PathBuf,
    pub metrics: String,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Scorer {
    /// Starts instance "a" on these topics; `extra` are more `FRAUDSTREAM__*` overrides.
    pub fn start(t: &Topics, extra: &[(&str, &str)]) -> Scorer {
        Scorer::start_instance(t, "a", extra)
    }

    /// The state directory of an instance: the same across restarts of that instance.
    pub fn state_dir(t: &Topics, instance: &str) -> PathBuf {
        std::env::temp_dir().join(format!("fraudstream-state-{}-{instance}", t.group))
    }

    /// Starts a named instance; restarting the same name reuses its state directory.
    pub fn start_instance(t: &Topics, instance: &str, extra: &[(&str, &str)]) -> Scorer {
        Scorer::launch(t, instance, extra, None)
    }

    /// Starts instance "a" with its address space limited to `kib` (`ulimit -v`): an
    /// allocation beyond it aborts the process.
    pub fn start_limited(t: &Topics, kib: u64, extra: &[(&str, &str)]) -> Scorer {
        Scorer::launch(t, "a", extra, Some(kib))
    }

    fn launch(t: &Topics, instance: &str, extra: &[(&str, &str)], limit: Option<u64>) -> Scorer {
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = std::env::temp_dir().join(format!("{}.log", unique("fraudstream")));
        let bin = env!("CARGO_BIN_EXE_fraudstream");
        let mut cmd = match limit {
            None => Command::new(bin),
            Some(kib) => {
                let mut c = Command::new("bash");
                c.args(["-c", &format!("ulimit -v {kib} && exec \"$0\" \"$@\""), bin]);
                c
            }
        };
        cmd.current_dir(repo())
            .args(["run", "--config", "docs/fraudstream.toml"])
            .env("FRAUDSTREAM__BROKERS", brokers())
            .env("FRAUDSTREAM__GROUP_ID", &t.group)
            .env("FRAUDSTREAM__TOPICS__TRANSACTIONS", &t.transactions)
            .env("FRAUDSTREAM__TOPICS__NAVIGATION", &t.navigation)
            .env("FRAUDSTREAM__TOPICS__LABELS", &t.labels)
            .env("FRAUDSTREAM__TOPICS__BLOCKLIST", &t.blocklist)
            .env("FRAUDSTREAM__TOPICS__VERDICTS", &t.verdicts)
            .env("FRAUDSTREAM__TOPICS__DEAD_LETTER", &t.dead_letter)
            .env("FRAUDSTREAM__METRICS__LISTEN", &metrics)
            .env("FRAUDSTREAM__METRICS__ADMIN_TOKEN", ADMIN_TOKEN)
            .env("FRAUDSTREAM__STATE__HMAC_SECRET", HMAC_SECRET)
            .env("FRAUDSTREAM__STATE__PATH", Scorer::state_dir(t, instance))
            // The fixtures are ULB rows with their feature vectors: the passthrough model
            // reads them (the default model reads Sparkov-style transactions).
            .env("FRAUDSTREAM__MODEL__MANIFEST", manifest_path())
            // A killed member must leave the group quickly for the restart test.
            .env("FRAUDSTREAM__KAFKA_CONSUMER__SESSION_TIMEOUT_MS", "6000")
            .env("FRAUDSTREAM__KAFKA_CONSUMER__HEARTBEAT_INTERVAL_MS", "1000")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        // An empty value removes a setting the harness sets (back to the config file's).
        for (k, v) in extra {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let child = cmd.spawn().expect("spawn fraudstream");
        Scorer {
            child,
            log,
            metrics,
        }
    }

    /// Starts instance "a" with its model and rules in files a test rewrites (watched every
    /// 100 ms), and waits until it is ready.
    pub async fn start_watching(t: &Topics, manifest: &Path, rules: &Path) -> Scorer {
        let scorer = Scorer::start(
            t,
            &[
                ("FRAUDSTREAM__MODEL__MANIFEST", manifest.to_str().unwrap()),
                ("FRAUDSTREAM__MODEL__WATCH_INTERVAL_MS", "100"),
                ("FRAUDSTREAM__DECISION__RULES", rules.to_str().unwrap()),
            ],
        );
        scorer.wait_ready(Duration::from_secs(60)).await;
        scorer
    }

    /// SIGTERM, and asserts a clean exit (code 0) within 30 s.
    pub fn stop(&mut self) {
        self.signal("TERM");
        assert!(self.wait(Duration::from_secs(30)).success());
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the process to exit; panics with its log after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "fraudstream did not exit in {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    /// GET a path of the metrics endpoint, retrying while the scorer starts.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        self.http("GET", path).await
    }

    /// The value of an unlabelled metric (0 when it was never counted).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.http_get("/metrics").await;
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.http_get("/readyz").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "not ready after {timeout:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A request to the metrics endpoint, retrying while the scorer starts.
    pub async fn http(&self, method: &str, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for _ in 0..100 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(&self.metrics).await {
                let req = format!(
                    "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes()).await.unwrap();
                let mut body = String::new();
                s.read_to_string(&mut body).await.unwrap();
                let status = body
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let text = body.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
                return (status, text);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "metrics endpoint {} never answered; log:\n{}",
            self.metrics,
            self.log_text()
        );
    }
}

impl Drop for Scorer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `output.audit-features` on: every feature value goes into the verdict.
pub const AUDIT: (&str, &str) = ("FRAUDSTREAM__OUTPUT__AUDIT_FEATURES", "true");
/// 2026-11-22T10:00:00Z, the event time tests count from.
pub const T0: i64 = 1_795_341_600_000;

/// A web transaction with a session, an e-mail and the device `dev-{customer}`.
pub fn tx(row: &SampleRow, id: &str, customer: &str, session: &str, email: &str, t: i64) -> String {
    row.json(id, customer, t).replace(
        "\"channel\":\"web\"",
        &format!(
            "\"channel\":\"web\",\"session_id\":\"{session}\",\"email\":\"{email}\",\"device_id\":\"dev-{customer}\""
        ),
    )
}

/// A navigation event.
pub fn nav(id: &str, customer: &str, session: &str, kind: &str, t: i64, device: &str) -> String {
    format!(
        r#"{{"event_id":"{id}","event_time":{t},"customer_id":"{customer}","session_id":"{session}","kind":"{kind}","device_id":"{device}"}}"#
    )
}

/// An audit feature of the first verdict of transaction `id`.
pub fn feature(
    v: &HashMap<String, Vec<fraudstream::decision::Verdict>>,
    id: &str,
    name: &str,
) -> f32 {
    v[id][0].features.as_ref().expect("audit features")[name]
}

/// One row of the committed ULB held-out sample.
#[derive(Clone)]
pub struct SampleRow {
    pub label: bool,
    /// The 30 feature values as committed text (Time, V1..V28, Amount).
    pub features_text: Vec<String>,
}

impl SampleRow {
    pub fn features(&self) -> Vec<f64> {
        self.features_text
            .iter()
            .map(|x| x.parse().unwrap())
            .collect()
    }

    pub fn amount(&self) -> &str {
        &self.features_text[29]
    }

    /// A JSON transaction carrying this row's features.
    pub fn json(&self, tx_id: &str, customer: &str, event_time_ms: i64) -> String {
        format!(
            r#"{{"transaction_id":"{tx_id}","event_time":{event_time_ms},"customer_id":"{customer}","merchant_id":"m-1","amount":{},"currency":"EUR","channel":"web","features":[{}]}}"#,
            self.amount(),
            self.features_text.join(",")
        )
    }
}

pub fn sample() -> Vec<SampleRow> {
    let f = std::fs::File::open(repo().join("tests/data/ulb-holdout-sample.csv.gz")).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(f)
        .read_to_string(&mut text)
        .unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header[0], "row");
    assert_eq!(header[31], "Class");
    lines
        .map(|l| {
            let cols: Vec<&str> = l.split(',').collect();
            SampleRow {
                label: cols[31] == "1",
                features_text: cols[1..31].iter().map(|s| s.to_string()).collect(),
            }
        })
        .collect()
}

/// `n` JSON transactions cycling through the sample: ids `{prefix}{i}`, customer (and key)
/// `c{i % customers}`, event time `t0 + i * step_ms`.
pub fn sample_stream(
    n: usize,
    prefix: &str,
    customers: usize,
    t0: i64,
    step_ms: i64,
) -> Vec<(String, Vec<u8>)> {
    sample()
        .iter()
        .cycle()
        .take(n)
        .enumerate()
        .map(|(i, r)| {
            let customer = format!("c{}", i % customers);
            let json = r.json(&format!("{prefix}{i}"), &customer, t0 + i as i64 * step_ms);
            (customer, json.into_bytes())
        })
        .collect()
}

/// Produces `records` in the background at about 1,000 a second (100 every 100 ms).
pub fn produce_paced(topic: &str, records: Vec<(String, Vec<u8>)>) -> tokio::task::JoinHandle<()> {
    let topic = topic.to_string();
    tokio::spawn(async move {
        let p = producer();
        for chunk in records.chunks(100) {
            send_all(&p, &topic, chunk).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// `fraudstream replay` of JSON lines (`lines`, written to a file in `dir`) into a training
/// table; returns the table's path.
pub fn replay(dir: &Path, lines: &str, partitions: i32) -> PathBuf {
    let input = dir.join("events.jsonl");
    std::fs::write(&input, lines).unwrap();
    let output = dir.join("table.csv");
    let status = Command::new(env!("CARGO_BIN_EXE_fraudstream"))
        .current_dir(repo())
        .args(["replay", "--quiet", "--partitions", &partitions.to_string()])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success(), "replay failed");
    output
}

/// One line of `tests/data/sparkov-sample.jsonl.gz` (Sparkov's held-out period as JSON).
pub struct SparkovTx {
    pub transaction_id: String,
    pub customer_id: String,
    pub label: bool,
    pub json: String,
}

/// The first `n` transactions of the committed Sparkov sample, in time order.
pub fn sparkov_sample(n: usize) -> Vec<SparkovTx> {
    use std::io::BufRead;
    let f = std::fs::File::open(repo().join("tests/data/sparkov-sample.jsonl.gz")).unwrap();
    std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .take(n)
        .map(|line| {
            let json = line.unwrap();
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            SparkovTx {
                transaction_id: v["transaction_id"].as_str().unwrap().to_string(),
                customer_id: v["customer_id"].as_str().unwrap().to_string(),
                label: v["is_fraud"] == 1,
                json,
            }
        })
        .collect()
}

/// The shipped manifest with feature `index` renamed to `name`, written to a new file.
pub fn manifest_with_feature(index: usize, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique("manifest"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest_path()).unwrap()).unwrap();
    manifest["features"][index] = name.into();
    manifest["onnx"] = repo().join("models/ulb-xgb.onnx").to_str().unwrap().into();
    let path = dir.join("m.json");
    std::fs::write(&path, manifest.to_string()).unwrap();
    path
}

/// Verdicts by transaction id (every copy, in arrival order).
pub fn verdicts_by_id(
    messages: &[OwnedMessage],
) -> HashMap<String, Vec<fraudstream::decision::Verdict>> {
    let mut out: HashMap<String, Vec<_>> = HashMap::new();
    for m in messages {
        let v: fraudstream::decision::Verdict =
            serde_json::from_slice(m.payload().expect("verdict payload")).expect("verdict JSON");
        assert_eq!(
            m.key(),
            Some(v.transaction_id.as_bytes()),
            "verdict keyed by transaction id"
        );
        out.entry(v.transaction_id.clone()).or_default().push(v);
    }
    out
}

pub fn manifest_path() -> PathBuf {
    repo().join("models/ulb-xgb.manifest.json")
}

pub fn model() -> fraudstream::model::Model {
    let lib = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .expect("ORT_DYLIB_PATH (scripts/test sets it)");
    let env = fraudstream::model::init_runtime(Some(Path::new(&lib))).expect("ONNX Runtime");
    fraudstream::model::Model::load(env, &manifest_path()).expect("model")
}

/// A process's peak resident memory (VmHWM), in KiB.
pub fn vm_hwm_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
