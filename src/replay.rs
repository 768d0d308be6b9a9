//! `fraudstream replay`: historical files → a training table, through the same feature code
//! as the online scorer ([`crate::features::engine`]).
//!
//! Inputs are Sparkov CSV (the column layout of `../shared/data/sparkov`) or JSON lines in
//! fraudstream's own format (a transaction has `transaction_id`, a navigation event
//! `event_id`; an optional `is_fraud` or `label` field is the label). Everything is read,
//! sorted by event time (stable; at equal times navigation first, as online), assigned to
//! the partition the online scorer would see it in (murmur2 of the customer id, as Kafka's
//! Java client and fraudstream's repartition stage compute it, modulo `--partitions`), and
//! replayed. Output: CSV with `transaction_id,event_time_ms,label` and one column per feature.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;

use crate::decode::{self, NavigationEvent, Requirements, Transaction};
use crate::features::engine;
use crate::features::FeatureSet;
use crate::source::partitioner::partition_for;
use crate::state::global::GlobalTables;
use crate::state::{Hasher, InMemory, StateBatch};

pub struct ReplayArgs {
    pub inputs: Vec<PathBuf>,
    pub output: PathBuf,
    pub partitions: u32,
    /// Feature names; empty: every named feature of the registry.
    pub features: Vec<String>,
    pub hmac_secret: String,
    pub progress: bool,
}

enum Event {
    Tx(Box<Transaction>, Option<u8>),
    Nav(NavigationEvent),
}

impl Event {
    fn time(&self) -> i64 {
        match self {
            Event::Tx(t, _) => t.event_time_ms,
            Event::Nav(n) => n.event_time_ms,
        }
    }
    fn customer(&self) -> &str {
        match self {
            Event::Tx(t, _) => &t.customer_id,
            Event::Nav(n) => &n.customer_id,
        }
    }
}

fn open(path: &Path) -> anyhow::Result<Box<dyn BufRead>> {
    if path == Path::new("-") {
        return Ok(Box::new(std::io::BufReader::new(std::io::stdin())));
    }
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        return Ok(Box::new(std::io::BufReader::new(
            flate2::read::GzDecoder::new(f),
        )));
    }
    Ok(Box::new(std::io::BufReader::new(f)))
}

/// Sparkov's `2019-01-01 00:00:32` (UTC) → epoch ms.
fn sparkov_time(s: &str) -> Option<i64> {
    let f = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let t = time::PrimitiveDateTime::parse(s, &f).ok()?;
    Some(t.assume_utc().unix_timestamp() * 1000)
}

fn read_sparkov(reader: Box<dyn BufRead>, name: &str, out: &mut Vec<Event>) -> anyhow::Result<()> {
    let mut csv = csv::Reader::from_reader(reader);
    let headers = csv.headers()?.clone();
    let col = |n: &str| {
        headers
            .iter()
            .position(|h| h == n)
            .ok_or_else(|| anyhow::anyhow!("{name}: no `{n}` column (not the Sparkov layout)"))
    };
    let [time, cc, merchant, category, amt, gender, city, state, zip, lat, long, pop, dob, id, mlat, mlong, fraud] =
        [
            "trans_date_trans_time",
            "cc_num",
            "merchant",
            "category",
            "amt",
            "gender",
            "city",
            "state",
            "zip",
            "lat",
            "long",
            "city_pop",
            "dob",
            "trans_num",
            "merch_lat",
            "merch_long",
            "is_fraud",
        ]
        .map(col);
    let (time, cc, merchant, amt, id, fraud) = (time?, cc?, merchant?, amt?, id?, fraud?);
    let opt = |r: &csv::StringRecord, c: &anyhow::Result<usize>| {
        c.as_ref()
            .ok()
            .and_then(|&i| r.get(i))
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let num = |r: &csv::StringRecord, c: &anyhow::Result<usize>| {
        opt(r, c).and_then(|s| s.parse::<f64>().ok())
    };
    for (line, r) in csv.records().enumerate() {
        let r = r.with_context(|| format!("{name}: row {}", line + 2))?;
        let bad = |what: &str| anyhow::anyhow!("{name}: row {}: bad {what}", line + 2);
        let tx = Transaction {
            transaction_id: r[id].to_string(),
            event_time_ms: sparkov_time(&r[time]).ok_or_else(|| bad("trans_date_trans_time"))?,
            customer_id: r[cc].to_string(),
            merchant_id: r[merchant].to_string(),
            amount: r[amt].parse().map_err(|_| bad("amt"))?,
            currency: "USD".into(),
            card_id: Some(r[cc].to_string()),
            merchant_category: opt(&r, &category),
            customer_lat: num(&r, &lat),
            customer_lon: num(&r, &long),
            merchant_lat: num(&r, &mlat),
            merchant_lon: num(&r, &mlong),
            customer_birth_date: opt(&r, &dob),
            customer_gender: opt(&r, &gender),
            customer_city: opt(&r, &city),
            customer_state: opt(&r, &state),
            customer_zip: opt(&r, &zip),
            customer_city_pop: num(&r, &pop).map(|p| p as i64),
            ..Transaction::default()
        };
        decode::validate(&tx, &Requirements::default())
            .map_err(|e| anyhow::anyhow!("{name}: row {}: {}", line + 2, e.message))?;
        let label = match &r[fraud] {
            "1" => 1,
            _ => 0,
        };
        out.push(Event::Tx(Box::new(tx), Some(label)));
    }
    Ok(())
}

fn read_jsonl(reader: Box<dyn BufRead>, name: &str, out: &mut Vec<Event>) -> anyhow::Result<()> {
    let decoder = decode::Decoder::new(&Default::default(), Requirements::default())?;
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{name}: line {}: not JSON", i + 1))?;
        let err = |e: decode::DecodeError| anyhow::anyhow!("{name}: line {}: {}", i + 1, e.message);
        if v.get("event_id").is_some() && v.get("transaction_id").is_none() {
            out.push(Event::Nav(
                decoder
                    .decode_navigation(Some(line.as_bytes()))
                    .map_err(err)?,
            ));
        } else {
            let tx = decoder.decode(Some(line.as_bytes())).map_err(err)?;
            let label = ["is_fraud", "label"]
                .iter()
                .find_map(|k| v.get(*k))
                .and_then(|l| l.as_i64().or_else(|| l.as_bool().map(i64::from)))
                .map(|l| (l != 0) as u8);
            out.push(Event::Tx(Box::new(tx), label));
        }
    }
    Ok(())
}

/// Runs the replay; returns (transactions, navigation events) replayed.
pub fn run(args: &ReplayArgs) -> anyhow::Result<(u64, u64)> {
    let started = Instant::now();
    let mut events = Vec::new();
    for path in &args.inputs {
        let name = path.display().to_string();
        let mut reader = open(path)?;
        let first = reader.fill_buf()?.first().copied();
        if first == Some(b'{') {
            read_jsonl(reader, &name, &mut events)?;
        } else {
            read_sparkov(reader, &name, &mut events)?;
        }
    }
    // Event-time order; navigation first at equal times; otherwise file order.
    events.sort_by_key(|e| (e.time(), matches!(e, Event::Tx(..))));
    let features = if args.features.is_empty() {
        FeatureSet::all_named()
    } else {
        FeatureSet::resolve(&args.features)?
    };
    let hasher = Hasher::new(args.hmac_secret.as_bytes());
    let tables = GlobalTables::default();
    let mut state = StateBatch::default();
    let out = std::fs::File::create(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let mut out = std::io::BufWriter::new(out);
    write!(out, "transaction_id,event_time_ms,label")?;
    for n in features.names() {
        write!(out, ",{n}")?;
    }
    writeln!(out)?;
    let mut row = Vec::with_capacity(features.len());
    let (mut txs, mut navs) = (0u64, 0u64);
    let total = events.len();
    let mut last_report = Instant::now();
    for (i, e) in events.iter().enumerate() {
        let p = partition_for(e.customer().as_bytes(), args.partitions);
        match e {
            Event::Nav(n) => {
                engine::navigation(p, n, &hasher, &mut state, &InMemory)?;
                navs += 1;
            }
            Event::Tx(tx, label) => {
                row.clear();
                engine::transaction(
                    p,
                    tx,
                    &hasher,
                    &tables,
                    &mut state,
                    &InMemory,
                    &mut [(&features, &mut row)],
                )?;
                let label = label.map_or(String::new(), |l| l.to_string());
                write!(
                    out,
                    "{},{},{label}",
                    csv_field(&tx.transaction_id),
                    tx.event_time_ms
                )?;
                for v in &row {
                    write!(out, ",{v}")?;
                }
                writeln!(out)?;
                txs += 1;
            }
        }
        if args.progress && (last_report.elapsed().as_secs() >= 1 || i + 1 == total) {
            progress(i + 1, total, started);
            last_report = Instant::now();
        }
    }
    out.flush()?;
    if args.progress {
        eprintln!();
    }
    Ok((txs, navs))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A one-line progress bar on stderr: `[#####     ] 52% 680000/1296675 events, 3.1 s`.
fn progress(done: usize, total: usize, started: Instant) {
    let width = 30;
    let filled = (done * width).checked_div(total).unwrap_or(width);
    let percent = (done * 100).checked_div(total).unwrap_or(100);
    eprint!(
        "\r[{}{}] {percent:>3}% {done}/{total} events, {:.1} s",
        "#".repeat(filled),
        " ".repeat(width - filled),
        started.elapsed().as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkov_rows_become_transactions() {
        let csv = "trans_date_trans_time,cc_num,merchant,category,amt,gender,city,state,zip,lat,long,city_pop,dob,trans_num,unix_time,merch_lat,merch_long,is_fraud\n\
2019-01-01 00:00:32,3536972734344713,\"fraud_Kuhn, Bernier and Sons\",shopping_pos,106.72,M,Silver City,IA,51571,41.113,-95.6269,649,1931-07-02,t1,1546300832,41.397052,-95.65765,1\n";
        let mut out = Vec::new();
        read_sparkov(Box::new(csv.as_bytes()), "test", &mut out).unwrap();
        let Event::Tx(tx, label) = &out[0] else {
            panic!()
        };
        assert_eq!(*label, Some(1));
        assert_eq!(tx.event_time_ms, 1_546_300_832_000);
        assert_eq!(tx.merchant_id, "fraud_Kuhn, Bernier and Sons");
        assert_eq!(tx.customer_city_pop, Some(649));
        assert_eq!(tx.card_id.as_deref(), Some("3536972734344713"));
        let bad = csv.replace("106.72", "x");
        assert!(read_sparkov(
            Box::new(std::io::Cursor::new(bad.into_bytes())),
            "test",
            &mut Vec::new()
        )
        .unwrap_err()
        .to_string()
        .contains("bad amt"));
    }
}
