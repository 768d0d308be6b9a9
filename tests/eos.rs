//! Exactly-once processing on Apache Kafka: a zombie instance is fenced, idle state expires by
//! its own partition's stream time (and leaves the changelog bounded), and a restore larger
//! than the memory it may use completes while the instance stays in the group.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fraudstream::source::partitioner::partition_for;
use fraudstream::state::{keys, CustomerState, Hasher};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;

use crate::util::*;

/// Every verdict on `topic` as a `read_uncommitted` reader sees it, aborted ones included.
async fn uncommitted_verdicts(topic: &str, quiet: Duration) -> usize {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("uncommitted"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let mut n = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(quiet, c.recv()).await {
        n += 1;
    }
    n
}

/// An instance stopped (SIGSTOP) past its session timeout and its transaction timeout while
/// its partitions move, then resumed: what it writes then is aborted, so a read_committed
/// reader sees exactly one verdict per transaction; it rejoins the group.
#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_instance_is_fenced_and_rejoins() {
    let t = topics("zombie", 2).await;
    let n = 8_000;
    let records = sample_stream(n, "z", 100, T0, 100);
    let mut a = Scorer::start_instance(&t, "a", &[]);
    a.wait_ready(Duration::from_secs(60)).await;
    let mut b = Scorer::start_instance(&t, "b", &[]);
    b.wait_ready(Duration::from_secs(60)).await;
    let (head, tail) = records.split_at(n / 2);
    send_all(&producer(), &t.transactions, head).await;
    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until(Duration::from_secs(60), |m| m.len() >= n / 4)
            .await
    );
    // Paused with work in hand: its session (6 s) and any open transaction (10 s) expire.
    a.signal("STOP");
    let producing = produce_paced(&t.transactions, tail.to_vec());
    tokio::time::sleep(Duration::from_secs(16)).await;
    a.signal("CONT");
    producing.await.unwrap();
    assert!(
        reader
            .read_until_distinct_keys(Duration::from_secs(120), n)
            .await,
        "log of b:\n{}",
        b.log_text()
    );
    reader.drain_for(Duration::from_secs(3)).await;
    let v = verdicts_by_id(&reader.messages);
    assert_eq!(v.len(), n);
    let twice = v.values().filter(|c| c.len() > 1).count();
    assert_eq!(
        twice, 0,
        "a read_committed reader saw {twice} transactions twice"
    );
    // The zombie did write: aborted verdicts a read_uncommitted reader sees.
    let all = uncommitted_verdicts(&t.verdicts, Duration::from_secs(3)).await;
    eprintln!("{n} transactions, {all} verdicts written (aborted ones included)");
    assert!(a.running(), "the zombie rejoins; log:\n{}", a.log_text());
    let log = a.log_text();
    let resumed = log.rfind("Partitions revoked").or(log.rfind("aborted"));
    assert!(resumed.is_some(), "the zombie noticed: {log}");
    a.stop();
    b.stop();
}

/// One event dated 100 days ahead on one partition moves that partition's stream time only:
/// the other partition's entities, live by its own time, keep their history; the far
/// partition's idle ones are expired (tombstoned).
#[tokio::test(flavor = "multi_thread")]
async fn far_future_event_expires_only_its_own_partition() {
    let t = topics("expiry", 2).await;
    let rows = sample();
    let home = |c: &str| partition_for(c.as_bytes(), 2);
    let on = |p: i32| -> Vec<String> {
        (0..)
            .map(|i| format!("cust{i}"))
            .filter(|c| home(c) == p)
            .take(5)
            .collect()
    };
    let (near, far) = (on(0), on(1));
    let p = producer();
    let mut n = 0;
    let mut send_tx = |c: String, id: String, t: i64| {
        n += 1;
        (c.clone(), rows[0].json(&id, &c, t).into_bytes())
    };
    let mut first = Vec::new();
    for (i, c) in near.iter().chain(&far).enumerate() {
        first.push(send_tx(c.clone(), format!("a{i}"), T0 + i as i64));
    }
    send_all(&p, &t.transactions, &first).await;
    // What the skew limit would dead-letter is let in here (tests/hostile.rs has that):
    // this test is about expiry by each partition's own time.
    let no_skew_limit = ("FRAUDSTREAM__INPUT__MAX_FUTURE_SKEW_MS", "0");
    let mut scorer = Scorer::start(&t, &[AUDIT, no_skew_limit]);
    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until(Duration::from_secs(60), |m| m.len() >= 10)
            .await
    );
    let future = T0 + 100 * 86_400_000;
    send_all(
        &p,
        &t.transactions,
        &[send_tx(far[0].clone(), "future".into(), future)],
    )
    .await;
    assert!(
        reader
            .read_until(Duration::from_secs(30), |m| m.len() >= 11)
            .await
    );
    // A commit later, the far partition's idle entities are gone; the near one's are not.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later: Vec<_> = near
        .iter()
        .chain(&far[1..])
        .enumerate()
        .map(|(i, c)| send_tx(c.clone(), format!("b{i}"), T0 + 86_400_000 + i as i64))
        .collect();
    send_all(&p, &t.transactions, &later).await;
    assert!(
        reader
            .read_until(Duration::from_secs(30), |m| m.len() >= 20)
            .await
    );
    let v = verdicts_by_id(&reader.messages);
    for i in 0..near.len() {
        assert_eq!(
            feature(&v, &format!("b{i}"), "customer_tx_total"),
            1.0,
            "near customer {i} keeps its history"
        );
    }
    for i in 0..far.len() - 1 {
        let id = format!("b{}", near.len() + i);
        assert_eq!(
            feature(&v, &id, "customer_tx_total"),
            0.0,
            "far customer {i} was expired"
        );
    }
    let (_, metrics) = scorer.http_get("/metrics").await;
    let expired: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fraudstream_expired_entities_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        expired >= 4.0,
        "the far partition's idle customers: {expired}\n{metrics}"
    );
    scorer.stop();
}

/// Customers come and go over 40 days of event time: with expiry and a compacted changelog,
/// what the changelog keeps is about the live entities, not every entity ever seen.
#[tokio::test(flavor = "multi_thread")]
async fn the_changelog_is_bounded_by_live_entities() {
    let t = topics("bounded", 2).await;
    let changelog = format!("{}-changelog", t.group);
    create_topics_with(&[(&changelog, 2, COMPACT_SOON)]).await;
    let rows = sample();
    let (days, per_day) = (40i64, 20usize);
    let mut records = Vec::new();
    for d in 0..days {
        for k in 0..per_day {
            let c = format!("d{d}-c{k}");
            for (j, row) in rows.iter().take(3).enumerate() {
                let time = T0 + d * 86_400_000 + (k * 3 + j) as i64 * 60_000;
                let json = row
                    .json(&format!("d{d}-{k}-{j}"), &c, time)
                    .replace("\"m-1\"", &format!("\"m-{d}\""));
                records.push((c.clone(), json.into_bytes()));
            }
        }
    }
    let n = records.len();
    let mut scorer = Scorer::start(&t, &[("RUST_LOG", "info,fraudstream::pipeline=debug")]);
    let p = producer();
    for chunk in records.chunks(300) {
        send_all(&p, &t.transactions, chunk).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until_distinct_keys(Duration::from_secs(120), n)
            .await,
        "log:\n{}",
        scorer.log_text()
    );
    // Customers, and each day's merchant on both partitions.
    let ever = days as usize * (per_day + 2);
    // Live at the end: about 9 days (7 idle, 1 of grace, the current one) of customers and
    // merchants, and a stream time per partition.
    let bound = 10 * (per_day + 2) + 2;
    // The stream goes on (the last day's customers buy again), as it would: the cleaner
    // cleans what is dirty, and drops the tombstones of expired entities in a later pass.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut round = 0;
    loop {
        let kept = read_all(&changelog);
        let mut latest = HashMap::new();
        for m in &kept {
            latest.insert(m.key().unwrap().to_vec(), m.payload().is_some());
        }
        let live = latest.values().filter(|l| **l).count();
        if live <= bound && kept.len() <= 2 * bound {
            eprintln!(
                "changelog: {} records, {live} live entities, of {ever} ever",
                kept.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the changelog keeps {} records, {live} live, of {ever} entities ever (bound {bound}); log:\n{}",
            kept.len(),
            scorer.log_text()
        );
        round += 1;
        let more: Vec<_> = (0..per_day)
            .map(|k| {
                let c = format!("d{}-c{k}", days - 1);
                let time = T0 + (days - 1) * 86_400_000 + 3_600_000 + round * 1000 + k as i64;
                let json = rows[0].json(&format!("more-{round}-{k}"), &c, time);
                (c, json.into_bytes())
            })
            .collect();
        send_all(&p, &t.transactions, &more).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (_, metrics) = scorer.http_get("/metrics").await;
    let expired = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fraudstream_expired_entities_total "))
        .unwrap_or("0")
        .to_string();
    eprintln!("{expired} entities expired");
    scorer.stop();
}

/// A changelog partition of some 200 MB (written here directly, as a previous owner would
/// have) is restored by an instance whose `max.poll.interval.ms` is 6 s: it stays in the
/// group throughout, its memory grows by far less than the partition, and the restored
/// state is what the next transactions see.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_larger_than_memory_stays_in_the_group() {
    let t = topics("big-restore", 1).await;
    let changelog = format!("{}-changelog", t.group);
    create_topics(&[(&changelog, 1)]).await;
    let hasher = Hasher::new(HMAC_SECRET.as_bytes());
    let customers = 400_000usize;
    let mut state = CustomerState {
        last_event_ms: Some(T0),
        ..Default::default()
    };
    for x in 0..7 {
        state.amounts.add(10.0 + x as f64);
    }
    for h in 0..16u64 {
        state.cards.note(h);
        state.devices.note(h + 100);
        state.ips.note(h + 200);
    }
    let mut value = Vec::new();
    state.encode(&mut value);
    let p = producer();
    let mut batch = Vec::with_capacity(10_000);
    let mut bytes = 0usize;
    for i in 0..customers {
        let mut key = vec![b'c'];
        key.extend_from_slice(&keys::key(0, &hasher.entity("customer", &format!("r{i}"))));
        bytes += key.len() + value.len();
        batch.push((key, value.clone()));
        if batch.len() == 10_000 || i + 1 == customers {
            let mut futures = Vec::with_capacity(batch.len());
            for (k, v) in &batch {
                let r = rdkafka::producer::FutureRecord::to(&changelog)
                    .partition(0)
                    .key(k)
                    .payload(v);
                futures.push(p.send_result(r).map_err(|(e, _)| e).expect("queued"));
            }
            for f in futures {
                f.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
            batch.clear();
        }
    }
    eprintln!("changelog: {customers} records, {} MB", bytes >> 20);

    // The same scorer's memory without a restore, for comparison.
    let idle = topics("small-restore", 1).await;
    let baseline = Scorer::start(&idle, &[]);
    baseline.wait_ready(Duration::from_secs(60)).await;
    let base_kb = vm_hwm_kb(baseline.id());
    drop(baseline);

    let tight = ("FRAUDSTREAM__KAFKA_CONSUMER__MAX_POLL_INTERVAL_MS", "6000");
    let session = ("FRAUDSTREAM__KAFKA_CONSUMER__SESSION_TIMEOUT_MS", "6000");
    let mut scorer = Scorer::start(&t, &[AUDIT, tight, session]);
    let started = Instant::now();
    scorer.wait_ready(Duration::from_secs(300)).await;
    let took = started.elapsed();
    let peak_kb = vm_hwm_kb(scorer.id());
    let log = scorer.log_text();
    assert!(log.contains("State restored"), "{log}");
    assert_eq!(
        log.matches("Partitions assigned").count(),
        1,
        "stayed in the group:\n{log}"
    );
    assert!(
        !log.contains("Partitions revoked"),
        "stayed in the group:\n{log}"
    );
    eprintln!(
        "restored {} MB in {took:?}; peak RSS {} MB vs {} MB without a restore",
        bytes >> 20,
        peak_kb >> 10,
        base_kb >> 10
    );
    assert!(
        took > Duration::from_secs(6),
        "the restore outlasted max.poll.interval.ms, or the test proves nothing"
    );
    // The memory the restore is allowed, well under the partition's size: RocksDB's
    // memtables (32 MB, twice while one is flushed), the restore consumer's prefetch (16 MB)
    // and a fetch (8 MB) bound it.
    let allowed_kb = 128 << 10;
    assert!(
        bytes as u64 >> 10 > allowed_kb * 3 / 2,
        "the partition is not larger than the allowance"
    );
    assert!(
        peak_kb < base_kb + allowed_kb,
        "a restore of {} MB took {} MB more than none",
        bytes >> 20,
        (peak_kb.saturating_sub(base_kb)) >> 10
    );
    // The restored state is what the next transactions see.
    let rows = sample();
    let mut reader = Reader::new(&t.verdicts);
    let probe: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            let c = format!("r{}", i * 1000);
            (
                c.clone(),
                rows[i]
                    .json(&format!("probe{i}"), &c, T0 + 3_600_000)
                    .into_bytes(),
            )
        })
        .collect();
    send_all(&producer(), &t.transactions, &probe).await;
    assert!(
        reader
            .read_until(Duration::from_secs(60), |m| m.len() >= 3)
            .await,
        "the probes were not scored:\n{}",
        scorer.log_text()
    );
    let v: HashMap<_, _> = verdicts_by_id(&reader.messages);
    for i in 0..3 {
        assert_eq!(feature(&v, &format!("probe{i}"), "customer_tx_total"), 7.0);
    }
    scorer.stop();
}
