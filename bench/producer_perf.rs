//! `producer-perf`: Apache Kafka's `kafka-producer-perf-test`, for machines without Java.
//! Same flags, same output lines, latency measured from send to acknowledgement.
//!
//! ```text
//! producer-perf --topic T --num-records N --throughput R (-1: unthrottled)
//!               (--record-size B | --payload-file F [--payload-delimiter D])
//!               [--producer-props k=v ...] [--producer.config FILE] [--warmup-records W]
//! ```
//!
//! Every 5 s: `N records sent, X records/sec (Y MB/sec), A ms avg latency, M ms max latency.`
//! At the end: `N records sent, X records/sec (Y MB/sec), A ms avg latency, M ms max latency,
//! P50 ms 50th, P95 ms 95th, P99 ms 99th, P999 ms 99.9th.` Records are unkeyed, as with the
//! Java tool; a payload file's records are picked at random, one per send. With
//! `--warmup-records W`, the first W records are summed up on a line of their own
//! (`... (warm-up)`) and the final line covers the records after them (steady state).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

const USAGE: &str =
    "usage: producer-perf --topic TOPIC --num-records N --throughput RATE (-1 = unthrottled)
       (--record-size BYTES | --payload-file FILE [--payload-delimiter DELIM])
       [--producer-props KEY=VALUE ...] [--producer.config FILE] [--warmup-records N]";

/// The command line, as `kafka-producer-perf-test` takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    pub topic: String,
    pub num_records: u64,
    pub throughput: f64,
    pub record_size: Option<usize>,
    pub payload_file: Option<String>,
    pub payload_delimiter: String,
    pub producer_props: BTreeMap<String, String>,
    pub producer_config: Option<String>,
    pub warmup_records: u64,
}

pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Args, String> {
    let mut args = args.into_iter().peekable();
    let (mut topic, mut num, mut rate) = (None, None, None);
    let mut out = Args {
        topic: String::new(),
        num_records: 0,
        throughput: 0.0,
        record_size: None,
        payload_file: None,
        payload_delimiter: "\n".into(),
        producer_props: BTreeMap::new(),
        producer_config: None,
        warmup_records: 0,
    };
    while let Some(flag) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("argument {name}: expected one argument"))
        };
        match flag.as_str() {
            "--topic" => topic = Some(value("--topic")?),
            "--num-records" => {
                num = Some(number::<u64>("--num-records", &value("--num-records")?)?)
            }
            "--throughput" => rate = Some(number::<f64>("--throughput", &value("--throughput")?)?),
            "--record-size" => {
                out.record_size = Some(number::<usize>("--record-size", &value("--record-size")?)?)
            }
            "--payload-file" => out.payload_file = Some(value("--payload-file")?),
            "--payload-delimiter" => {
                out.payload_delimiter = unescape(&value("--payload-delimiter")?)
            }
            "--producer.config" => out.producer_config = Some(value("--producer.config")?),
            "--warmup-records" => {
                out.warmup_records = number::<u64>("--warmup-records", &value("--warmup-records")?)?
            }
            "--producer-props" => {
                let mut any = false;
                while let Some(kv) = args.next_if(|a| !a.starts_with("--")) {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| format!("invalid property: {kv} (expected KEY=VALUE)"))?;
                    out.producer_props.insert(k.trim().into(), v.trim().into());
                    any = true;
                }
                if !any {
                    return Err("argument --producer-props: expected at least one argument".into());
                }
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unrecognized argument: {other}")),
        }
    }
    out.topic = topic.ok_or("argument --topic is required")?;
    out.num_records = num.ok_or("argument --num-records is required")?;
    out.throughput = rate.ok_or("argument --throughput is required")?;
    match (&out.record_size, &out.payload_file) {
        (None, None) => {
            return Err("either --record-size or --payload-file must be specified".into())
        }
        (Some(_), Some(_)) => {
            return Err("argument --payload-file: not allowed with argument --record-size".into())
        }
        _ => {}
    }
    if out.producer_props.is_empty() && out.producer_config.is_none() {
        return Err("either --producer-props or --producer.config must be specified".into());
    }
    if out.warmup_records >= out.num_records && out.warmup_records > 0 {
        return Err("--warmup-records must be less than --num-records".into());
    }
    Ok(out)
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("argument {flag}: invalid value: '{v}'"))
}

/// `\n`, `\t`, `\r`, `\\` as the shell passes them.
fn unescape(s: &str) -> String {
    s.replace("\\n", "\n")
        .replace("\\t", "\t")
        .replace("\\r", "\r")
        .replace("\\\\", "\\")
}

/// `key=value` lines of a properties file (`#` and `!` comments).
pub fn read_properties(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=').or_else(|| l.split_once(':'))?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The records of a payload file: its text split on the delimiter, empty pieces dropped.
pub fn split_payloads(text: &str, delimiter: &str) -> Vec<Vec<u8>> {
    text.split(delimiter)
        .filter(|p| !p.is_empty())
        .map(|p| p.as_bytes().to_vec())
        .collect()
}

/// Values at the given fractions of `latencies`, as the Java tool picks them: the element at
/// index ⌊p · n⌋ of the sorted values.
pub fn percentiles(latencies: &mut [u32], ps: &[f64]) -> Vec<u32> {
    latencies.sort_unstable();
    let n = latencies.len();
    ps.iter()
        .map(|p| {
            if n == 0 {
                0
            } else {
                latencies[((p * n as f64) as usize).min(n - 1)]
            }
        })
        .collect()
}

/// Counts, sums and keeps the latencies of acknowledged records.
#[derive(Debug, Default)]
pub struct Stats {
    count: u64,
    bytes: u64,
    total_latency_ms: f64,
    max_latency_ms: f64,
    latencies: Vec<u32>,
    errors: u64,
    window: Window,
}

#[derive(Debug, Default)]
struct Window {
    count: u64,
    bytes: u64,
    total_latency_ms: f64,
    max_latency_ms: f64,
}

impl Stats {
    pub fn record(&mut self, latency: Duration, bytes: usize) {
        let ms = latency.as_secs_f64() * 1000.0;
        self.count += 1;
        self.bytes += bytes as u64;
        self.total_latency_ms += ms;
        self.max_latency_ms = self.max_latency_ms.max(ms);
        self.latencies.push(ms as u32);
        let w = &mut self.window;
        w.count += 1;
        w.bytes += bytes as u64;
        w.total_latency_ms += ms;
        w.max_latency_ms = w.max_latency_ms.max(ms);
    }

    /// The interim line for the window that ends now (`elapsed` long), then a new window.
    pub fn window_line(&mut self, elapsed: Duration) -> String {
        let w = std::mem::take(&mut self.window);
        let secs = elapsed.as_secs_f64().max(1e-9);
        format!(
            "{} records sent, {:.1} records/sec ({:.2} MB/sec), {:.1} ms avg latency, {:.1} ms max latency.",
            w.count,
            w.count as f64 / secs,
            w.bytes as f64 / secs / (1024.0 * 1024.0),
            w.total_latency_ms / (w.count.max(1) as f64),
            w.max_latency_ms
        )
    }

    /// The final line over everything recorded in `elapsed`.
    pub fn total_line(&mut self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let p = percentiles(&mut self.latencies, &[0.5, 0.95, 0.99, 0.999]);
        format!(
            "{} records sent, {:.6} records/sec ({:.2} MB/sec), {:.2} ms avg latency, {:.2} ms max latency, {} ms 50th, {} ms 95th, {} ms 99th, {} ms 99.9th.",
            self.count,
            self.count as f64 / secs,
            self.bytes as f64 / secs / (1024.0 * 1024.0),
            self.total_latency_ms / (self.count.max(1) as f64),
            self.max_latency_ms,
            p[0],
            p[1],
            p[2],
            p[3]
        )
    }
}

/// What the delivery callback needs: the stats of the current phase.
struct Context {
    stats: Arc<Mutex<Stats>>,
}

impl ClientContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<(Instant, usize)>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Self::DeliveryOpaque) {
        let Ok(mut stats) = self.stats.lock() else {
            return;
        };
        match result {
            Ok(_) => stats.record(sent.0.elapsed(), sent.1),
            Err((e, _)) => {
                stats.errors += 1;
                if stats.errors <= 10 {
                    eprintln!("Error when sending message to topic: {e}");
                }
            }
        }
    }
}

/// Sleeps as needed to hold `target` records a second (Kafka's ThroughputThrottler).
struct Throttle {
    target: f64,
    start: Instant,
}

impl Throttle {
    fn wait(&self, sent: u64) {
        if self.target <= 0.0 {
            return;
        }
        let due = self.start + Duration::from_secs_f64(sent as f64 / self.target);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let mut config = ClientConfig::new();
    if let Some(path) = &args.producer_config {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        for (k, v) in read_properties(&text) {
            config.set(k, v);
        }
    }
    for (k, v) in &args.producer_props {
        config.set(k, v);
    }
    let payloads = match (&args.payload_file, args.record_size) {
        (Some(path), _) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            let p = split_payloads(&text, &args.payload_delimiter);
            if p.is_empty() {
                return Err(format!("{path}: no payloads"));
            }
            println!("Reading payloads from: {path}");
            println!("Number of messages read: {}", p.len());
            p
        }
        // Random upper-case letters, as the Java tool sends.
        (None, Some(size)) => {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            vec![(0..size)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    b'A' + (seed % 26) as u8
                })
                .collect()]
        }
        (None, None) => unreachable!("checked by parse_args"),
    };

    let stats = Arc::new(Mutex::new(Stats::default()));
    let producer: ThreadedProducer<Context> = config
        .create_with_context(Context {
            stats: stats.clone(),
        })
        .map_err(|e| format!("cannot create the producer: {e}"))?;
    let throttle = Throttle {
        target: args.throughput,
        start: Instant::now(),
    };
    let mut pick = 0x2545_f491_4f6c_dd1du64;
    let (mut window_start, mut phase_start) = (Instant::now(), Instant::now());
    for i in 0..args.num_records {
        if args.warmup_records > 0 && i == args.warmup_records {
            // Wait for the warm-up's acknowledgements, sum them up, start afresh.
            let _ = producer.flush(Duration::from_secs(60));
            let mut s = stats.lock().map_err(|_| "stats poisoned")?;
            println!(
                "{} (warm-up)",
                s.total_line(phase_start.elapsed()).trim_end_matches('.')
            );
            *s = Stats::default();
            phase_start = Instant::now();
            window_start = phase_start;
        }
        pick ^= pick << 13;
        pick ^= pick >> 7;
        pick ^= pick << 17;
        let payload = &payloads[(pick % payloads.len() as u64) as usize];
        let mut record: BaseRecord<'_, [u8], [u8], Box<(Instant, usize)>> =
            BaseRecord::with_opaque_to(&args.topic, Box::new((Instant::now(), payload.len())))
                .payload(&payload[..]);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r)) => {
                    if !matches!(
                        e.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ) {
                        return Err(format!("send failed: {e}"));
                    }
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        if window_start.elapsed() >= Duration::from_secs(5) {
            let line = stats
                .lock()
                .map_err(|_| "stats poisoned")?
                .window_line(window_start.elapsed());
            println!("{line}");
            window_start = Instant::now();
        }
        throttle.wait(i + 1);
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(|e| format!("flush: {e}"))?;
    let mut s = stats.lock().map_err(|_| "stats poisoned")?;
    println!("{}", s.total_line(phase_start.elapsed()));
    if s.errors > 0 {
        return Err(format!("{} records failed", s.errors));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse_args(s.split_whitespace().map(String::from))
    }

    #[test]
    fn flags_as_kafka_producer_perf_test_takes_them() {
        let a = args("--topic t --num-records 1000 --throughput -1 --record-size 100 --producer-props bootstrap.servers=h:9092 linger.ms=5 --warmup-records 10").unwrap();
        assert_eq!(a.topic, "t");
        assert_eq!(a.num_records, 1000);
        assert_eq!(a.throughput, -1.0);
        assert_eq!(a.record_size, Some(100));
        assert_eq!(a.warmup_records, 10);
        assert_eq!(a.producer_props["bootstrap.servers"], "h:9092");
        assert_eq!(a.producer_props["linger.ms"], "5");
        let a = args("--payload-file p.json --payload-delimiter \\t --topic t --num-records 5 --throughput 500 --producer.config c.properties").unwrap();
        assert_eq!(a.payload_file.as_deref(), Some("p.json"));
        assert_eq!(a.payload_delimiter, "\t");
        assert_eq!(a.producer_config.as_deref(), Some("c.properties"));
        assert_eq!(a.payload_delimiter, "\t");
    }

    #[test]
    fn bad_command_lines_are_refused_with_the_reason() {
        let base = "--topic t --num-records 10 --throughput 1 --producer-props a=b";
        assert!(args(base)
            .unwrap_err()
            .contains("--record-size or --payload-file"));
        assert!(args(&format!("{base} --record-size 1 --payload-file f"))
            .unwrap_err()
            .contains("not allowed"));
        assert!(
            args("--num-records 1 --throughput 1 --record-size 1 --producer-props a=b")
                .unwrap_err()
                .contains("--topic is required")
        );
        assert!(args(
            "--topic t --num-records x --throughput 1 --record-size 1 --producer-props a=b"
        )
        .unwrap_err()
        .contains("invalid value: 'x'"));
        assert!(
            args("--topic t --num-records 1 --throughput 1 --record-size 1")
                .unwrap_err()
                .contains("--producer-props or --producer.config")
        );
        assert!(
            args(&format!("{base} --record-size 1 --producer-props novalue"))
                .unwrap_err()
                .contains("KEY=VALUE")
        );
        assert!(args(&format!("{base} --record-size 1 --bogus"))
            .unwrap_err()
            .contains("unrecognized"));
        assert!(args(&format!("{base} --record-size 1 --warmup-records 10"))
            .unwrap_err()
            .contains("less than"));
    }

    #[test]
    fn percentiles_pick_floor_of_p_times_n_like_the_java_tool() {
        let mut v: Vec<u32> = (1..=1000).rev().collect();
        assert_eq!(
            percentiles(&mut v, &[0.5, 0.95, 0.99, 0.999]),
            [501, 951, 991, 1000]
        );
        let mut one = vec![7];
        assert_eq!(percentiles(&mut one, &[0.5, 0.999]), [7, 7]);
        assert_eq!(percentiles(&mut [], &[0.5]), [0]);
        let mut v = vec![5, 1, 3, 2, 4];
        assert_eq!(percentiles(&mut v, &[0.0, 0.5, 0.99]), [1, 3, 5]);
    }

    #[test]
    fn output_lines_have_the_java_tools_shape() {
        let mut s = Stats::default();
        for ms in [1u64, 2, 3, 10] {
            s.record(Duration::from_millis(ms), 1024 * 256);
        }
        assert_eq!(
            s.window_line(Duration::from_secs(2)),
            "4 records sent, 2.0 records/sec (0.50 MB/sec), 4.0 ms avg latency, 10.0 ms max latency."
        );
        assert_eq!(
            s.window_line(Duration::from_secs(1)),
            "0 records sent, 0.0 records/sec (0.00 MB/sec), 0.0 ms avg latency, 0.0 ms max latency.",
            "a new window after each line"
        );
        assert_eq!(
            s.total_line(Duration::from_secs(4)),
            "4 records sent, 1.000000 records/sec (0.25 MB/sec), 4.00 ms avg latency, 10.00 ms max latency, 3 ms 50th, 10 ms 95th, 10 ms 99th, 10 ms 99.9th."
        );
    }

    #[test]
    fn payload_files_and_properties() {
        assert_eq!(
            split_payloads("{\"a\":1}\n{\"a\":2}\n\n", "\n"),
            vec![b"{\"a\":1}".to_vec(), b"{\"a\":2}".to_vec()]
        );
        let p = read_properties("# c\nbootstrap.servers = h:1\n! x\nacks:all\n\n");
        assert_eq!(p["bootstrap.servers"], "h:1");
        assert_eq!(p["acks"], "all");
        assert_eq!(p.len(), 2);
    }
}
