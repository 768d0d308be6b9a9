//! What an outsider who can write a transaction can try, and what happens: an absurd amount
//! and an event time from the far future are dead-lettered with their reason, and move
//! nothing (no statistic, no stream time); a message as large as the broker takes, with a
//! huge key and headers, is dead-lettered cut to fit; the partition goes on. And what the
//! operator can break: a dead-letter topic that is gone stops the scorer with the reason,
//! losing nothing.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::util::*;

/// One customer's purchases at one merchant, then an amount near the largest double and an
/// event dated 2100 among them: both dead-lettered; the purchases after them see exactly the
/// history they would have without them (merchant z-score, customer count, no expiry).
#[tokio::test(flavor = "multi_thread")]
async fn absurd_amounts_and_far_future_times_move_nothing() {
    let rows = sample();
    let purchase = |i: usize, t: i64| rows[i % 40].json(&format!("h{i}"), "c", t);
    let clean: Vec<String> = (0..20)
        .map(|i| purchase(i, T0 + i as i64 * 60_000))
        .collect();
    let mut hostile = clean.clone();
    let huge = purchase(99, T0 + 9 * 60_000 + 1).replace(
        &format!("\"amount\":{}", rows[99 % 40].amount()),
        "\"amount\":1.7e308",
    );
    let future = purchase(98, 4_102_444_800_000); // 2100-01-01
    hostile.insert(10, huge.replace("\"h99\"", "\"huge\""));
    hostile.insert(11, future.replace("\"h98\"", "\"future\""));

    let mut runs = Vec::new();
    for (name, input) in [("clean", &clean), ("hostile", &hostile)] {
        let t = topics(&format!("hostile-{name}"), 1).await;
        let p = producer();
        for v in input {
            send(&p, &t.transactions, Some(b"c"), Some(v.as_bytes())).await;
        }
        let mut scorer = Scorer::start(&t, &[AUDIT]);
        let mut reader = Reader::new(&t.verdicts);
        assert!(
            reader
                .read_until(Duration::from_secs(60), |m| m.len() >= 20)
                .await,
            "log:\n{}",
            scorer.log_text()
        );
        let mut dlq = Reader::new(&t.dead_letter);
        let bad = if name == "hostile" { 2 } else { 0 };
        dlq.read_until(Duration::from_secs(10), |m| m.len() >= bad)
            .await;
        dlq.drain_for(Duration::from_secs(1)).await;
        assert_eq!(dlq.messages.len(), bad);
        let kinds: Vec<String> = dlq
            .messages
            .iter()
            .filter_map(|m| header(m, "fraudstream.error.kind"))
            .collect();
        if bad > 0 {
            assert!(kinds.contains(&"invalid-amount".to_string()), "{kinds:?}");
            assert!(kinds.contains(&"event-time-skew".to_string()), "{kinds:?}");
        }
        assert!(scorer.running());
        scorer.stop();
        runs.push(verdicts_by_id(&reader.messages));
    }
    let (clean, hostile) = (&runs[0], &runs[1]);
    assert!(!hostile.contains_key("huge") && !hostile.contains_key("future"));
    for i in 0..20 {
        let id = format!("h{i}");
        assert_eq!(
            clean[&id][0].features, hostile[&id][0].features,
            "{id}: the same features as without the hostile records"
        );
    }
    let last = |v: &std::collections::HashMap<String, Vec<fraudstream::decision::Verdict>>| {
        feature(v, "h19", "merchant_amount_zscore")
    };
    assert!(last(hostile).is_finite() && last(hostile) != 0.0);
}

/// A producer that sends records as large as the broker takes (1 MiB).
fn large_producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("message.max.bytes", "1048000")
        .create()
        .expect("producer")
}

/// Sends one record with a key, a value and headers (name, value bytes).
async fn send_with_headers(
    p: &FutureProducer,
    topic: &str,
    key: &[u8],
    value: &[u8],
    headers: &[(&str, Vec<u8>)],
) {
    let h = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: Some(v),
        })
    });
    p.send(
        FutureRecord::to(topic).key(key).payload(value).headers(h),
        Duration::from_secs(10),
    )
    .await
    .map_err(|(e, _)| e)
    .expect("produce");
}

fn record_bytes(m: &rdkafka::message::OwnedMessage) -> usize {
    use rdkafka::message::{Headers, Message};
    m.key().map_or(0, <[u8]>::len)
        + m.payload().map_or(0, <[u8]>::len)
        + m.headers().map_or(0, |h| {
            h.iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                .sum()
        })
}

/// A message of 1,040,000 bytes (near the broker's limit of 1 MiB: a 990,000-byte value, a
/// 10-kB key, 40 kB of headers) between valid transactions, once with the dead-letter
/// topic's defaults and once with a topic that takes at most 50,000 bytes: each time it is
/// dead-lettered cut to fit, saying so, with its source; a 20-kB trace header is not copied
/// to the verdict; every valid transaction is scored. Before dead letters were cut, the
/// first one failed to produce at every attempt and the partition never moved again.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_as_large_as_the_broker_takes_is_dead_lettered_cut_to_fit() {
    let rows = sample();
    for (name, topic_max) in [("default", None), ("small-dlq", Some("50000"))] {
        let mut t = topics(&format!("hostile-large-{name}"), 1).await;
        if let Some(max) = topic_max {
            t.dead_letter = unique("hostile-small-dlq");
            create_topics_with(&[(&t.dead_letter, 1, &[("max.message.bytes", max)])]).await;
        }
        let p = large_producer();
        let valid = |i: usize| rows[i].json(&format!("ok{i}"), "c", T0 + i as i64 * 1000);
        send(&p, &t.transactions, Some(b"c"), Some(valid(0).as_bytes())).await;
        send_with_headers(
            &p,
            &t.transactions,
            &[b'k'; 10_000],
            &[b'x'; 990_000],
            &[("h1", vec![b'v'; 20_000]), ("h2", vec![b'v'; 20_000])],
        )
        .await;
        send_with_headers(
            &p,
            &t.transactions,
            b"c",
            valid(1).as_bytes(),
            &[("traceparent", vec![b't'; 20_000])],
        )
        .await;
        send(&p, &t.transactions, Some(b"c"), Some(valid(2).as_bytes())).await;

        let mut scorer = Scorer::start(&t, &[]);
        let mut verdicts = Reader::new(&t.verdicts);
        assert!(
            verdicts
                .read_until(Duration::from_secs(60), |m| m.len() >= 3)
                .await,
            "{name}: the valid transactions were not all scored; log:\n{}",
            scorer.log_text()
        );
        let traced = verdicts
            .messages
            .iter()
            .find(|m| header(m, "traceparent").is_some());
        assert!(traced.is_none(), "a 20-kB trace header was copied");
        let mut dlq = Reader::new(&t.dead_letter);
        assert!(
            dlq.read_until(Duration::from_secs(10), |m| !m.is_empty())
                .await
        );
        let d = &dlq.messages[0];
        let limit = if topic_max.is_some() { 50_000 } else { 900_000 };
        assert!(
            record_bytes(d) <= limit,
            "{name}: dead letter of {} bytes",
            record_bytes(d)
        );
        assert_eq!(
            header(d, "fraudstream.error.kind").as_deref(),
            Some("oversized")
        );
        assert_eq!(
            header(d, "fraudstream.payload.truncated").as_deref(),
            Some("990000")
        );
        assert_eq!(header(d, "fraudstream.source.offset").as_deref(), Some("1"));
        if topic_max.is_some() {
            assert_eq!(
                header(d, "fraudstream.headers.dropped").as_deref(),
                Some("2")
            );
        } else {
            assert_eq!(header(d, "h1").map(|v| v.len()), Some(20_000));
        }
        assert!(scorer.running());
        scorer.stop();
    }
}

/// The dead-letter topic is deleted under a running scorer, then a bad record arrives
/// among valid ones: the scorer stops (non-zero) within a minute with the reason and what
/// to do, and its open transaction is aborted (no verdict of it visible). With the topic
/// back, the restarted scorer dead-letters the bad record and scores every valid one
/// exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_topic_that_is_gone_stops_the_scorer_with_the_reason() {
    let rows = sample();
    let t = topics("hostile-dlq-gone", 1).await;
    let p = producer();
    let valid = |i: usize| rows[i].json(&format!("g{i}"), "c", T0 + i as i64 * 1000);
    send(&p, &t.transactions, Some(b"c"), Some(valid(0).as_bytes())).await;
    let mut scorer = Scorer::start(&t, &[]);
    let mut verdicts = Reader::new(&t.verdicts);
    assert!(
        verdicts
            .read_until(Duration::from_secs(60), |m| !m.is_empty())
            .await,
        "log:\n{}",
        scorer.log_text()
    );

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    for r in admin
        .delete_topics(&[&t.dead_letter], &AdminOptions::new())
        .await
        .expect("delete topic")
    {
        r.expect("topic deleted");
    }
    send(&p, &t.transactions, Some(b"c"), Some(valid(1).as_bytes())).await;
    send(&p, &t.transactions, Some(b"c"), Some(b"not json")).await;
    send(&p, &t.transactions, Some(b"c"), Some(valid(2).as_bytes())).await;

    let status = scorer.wait(Duration::from_secs(90));
    assert!(!status.success(), "exited with {status}");
    let log = scorer.log_text();
    assert!(
        log.contains(&format!("cannot produce to topic `{}`", t.dead_letter))
            && log.contains("create it again"),
        "the reason is not in the log:\n{log}"
    );
    verdicts.drain_for(Duration::from_secs(2)).await;
    assert_eq!(
        verdicts.messages.len(),
        1,
        "verdicts of the aborted transaction are visible"
    );

    create_topics(&[(&t.dead_letter, 1)]).await;
    let mut scorer = Scorer::start(&t, &[]);
    assert!(
        verdicts
            .read_until(Duration::from_secs(60), |m| m.len() >= 3)
            .await,
        "log:\n{}",
        scorer.log_text()
    );
    let mut dlq = Reader::new(&t.dead_letter);
    assert!(
        dlq.read_until(Duration::from_secs(10), |m| !m.is_empty())
            .await
    );
    verdicts.drain_for(Duration::from_secs(2)).await;
    let by_id = verdicts_by_id(&verdicts.messages);
    for i in 0..3 {
        assert_eq!(by_id[&format!("g{i}")].len(), 1, "g{i} exactly once");
    }
    assert_eq!(dlq.messages.len(), 1);
    scorer.stop();
}

/// 5,000 navigation events of 20 kB each (padding any sender may add: 100 MB) behind a
/// backlog of 20,000 earlier transactions: they pile up in the event-time merge while the
/// transactions go first. With `batch.max-buffered-bytes` = 4 MiB the merge holds at most
/// the partition's share (4 MiB over 3 inputs) plus one pull of 200 records (each counted
/// as twice its 20 kB), as `fraudstream_merge_buffered_bytes` shows (sampled every 200 ms);
/// with a bound of 1 GiB it holds tens of MB. Every transaction is scored either way.
#[tokio::test(flavor = "multi_thread")]
async fn buffered_input_is_bounded_in_bytes() {
    let rows = sample();
    let txs: Vec<(String, Vec<u8>)> = (0..20_000)
        .map(|i| {
            let c = format!("c{}", i % 100);
            let v = rows[i % 40].json(&format!("b{i}"), &c, T0 + i as i64 * 1000);
            (c, v.into_bytes())
        })
        .collect();
    let padding = "x".repeat(20_000);
    let navs: Vec<(String, Vec<u8>)> = (0..5_000)
        .map(|i| {
            let c = format!("c{}", i % 100);
            let n = nav(
                &format!("n{i}"),
                &c,
                &format!("s{c}"),
                "page_view",
                T0 + 30_000_000 + i as i64,
                "d",
            );
            let padded = n.replace("}", &format!(",\"note\":\"{padding}\"}}"));
            (c, padded.into_bytes())
        })
        .collect();
    let mut peaks = Vec::new();
    for (name, bound) in [("bounded", "4194304"), ("unbounded", "1073741824")] {
        let t = topics(&format!("hostile-bytes-{name}"), 1).await;
        let p = producer();
        send_all(&p, &t.transactions, &txs).await;
        send_all(&p, &t.navigation, &navs).await;
        let mut scorer = Scorer::start(
            &t,
            &[
                ("FRAUDSTREAM__BATCH__MAX_BUFFERED_BYTES", bound),
                ("FRAUDSTREAM__BATCH__MAX_RECORDS", "200"),
            ],
        );
        let mut verdicts = Reader::new(&t.verdicts);
        let mut peak_gauge = 0f64;
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        while verdicts.messages.len() < txs.len() && std::time::Instant::now() < deadline {
            verdicts
                .read_until(Duration::from_millis(200), |_| false)
                .await;
            let (_, metrics) = scorer.http_get("/metrics").await;
            // One series per worker: what the process holds is their sum.
            let held: f64 = metrics
                .lines()
                .filter(|l| l.starts_with("fraudstream_merge_buffered_bytes{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            peak_gauge = peak_gauge.max(held);
        }
        assert_eq!(
            verdicts.messages.len(),
            txs.len(),
            "{name}: not every transaction scored; log:\n{}",
            scorer.log_text()
        );
        let peak_kb = vm_hwm_kb(scorer.id());
        eprintln!(
            "{name}: peak RSS {} MB, merge held up to {:.1} MB",
            peak_kb / 1024,
            peak_gauge / 1e6
        );
        peaks.push(peak_gauge);
        scorer.stop();
    }
    let (bounded, unbounded) = (peaks[0], peaks[1]);
    assert!(
        bounded < 1.4e6 + 200.0 * 40e3 + 1e6,
        "the merge held {bounded} bytes under a 4-MiB bound"
    );
    assert!(
        unbounded > 15e6,
        "without a bound the merge should hold tens of MB ({unbounded})"
    );
}

/// Labels for 5 e-mails and blocklist entries for 5 IPs with `state.max-global-entries` = 3:
/// each table holds 3 entities, the other records are refused, counted and logged, a flood
/// of 2,000 more labels for a known e-mail adds no entity (its times are capped at 1,000:
/// `state::global` unit tests), and transactions are scored meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn global_tables_are_bounded() {
    let rows = sample();
    let t = topics("hostile-global", 1).await;
    let p = producer();
    let mut labels: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            let v =
                format!(r#"{{"label_time":{T0},"kind":"fraud","email":"victim{i}@example.com"}}"#);
            (format!("l{i}"), v.into_bytes())
        })
        .collect();
    labels.extend((0..2000).map(|i| {
        let v = format!(
            r#"{{"label_time":{},"kind":"fraud","email":"victim0@example.com"}}"#,
            T0 + i
        );
        (format!("f{i}"), v.into_bytes())
    }));
    send_all(&p, &t.labels, &labels).await;
    let blocks: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            let v = format!(r#"{{"added_at":{T0},"reason":"proxy"}}"#);
            (format!("ip:203.0.113.{i}"), v.into_bytes())
        })
        .collect();
    send_all(&p, &t.blocklist, &blocks).await;
    let txs: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| {
            let v = rows[i].json(&format!("t{i}"), "c", T0 + 60_000 + i as i64);
            ("c".to_string(), v.into_bytes())
        })
        .collect();
    send_all(&p, &t.transactions, &txs).await;

    let mut scorer = Scorer::start(&t, &[("FRAUDSTREAM__STATE__MAX_GLOBAL_ENTRIES", "3")]);
    let mut verdicts = Reader::new(&t.verdicts);
    assert!(
        verdicts
            .read_until(Duration::from_secs(60), |m| m.len() >= 50)
            .await,
        "log:\n{}",
        scorer.log_text()
    );
    let (_, metrics) = scorer.http_get("/metrics").await;
    for line in [
        "fraudstream_global_table_entries{table=\"labels\"} 3",
        "fraudstream_global_table_entries{table=\"blocklist\"} 3",
        "fraudstream_global_table_refused_total{table=\"labels\"} 2",
        "fraudstream_global_table_refused_total{table=\"blocklist\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    assert!(scorer.log_text().contains("Global table full"));
    scorer.stop();
}

/// Fair service under backlog: one partition holds 20,000 transactions when another has 20
/// waiting, and 20 more arrive on it while the backlog drains; both twenties are answered
/// while most of the backlog still waits. Each input partition has a queue of its own, taken
/// from in turn (`pipeline::intake::Queues`), and the merge serves the partitions it holds in
/// turn (`pipeline::merge::tests::partitions_are_served_in_turn_under_backlog`). With the
/// consumer's one queue, which delivers what it prefetched in order, the first 20 came after
/// 10,758 of the backlog, the second after 19,106 (docs/RELIABILITY.md).
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_behind_a_backlog_is_served_in_turn() {
    use fraudstream::source::partitioner::partition_for;
    use rdkafka::Message;
    const BACKLOG: usize = 20_000;
    let t = topics("hostile-fair", 2).await;
    let on = |p: i32| -> Vec<String> {
        (0..)
            .map(|i| format!("fair-{i}"))
            .filter(|c| partition_for(c.as_bytes(), 2) == p)
            .take(20)
            .collect()
    };
    let (crowd, few) = (on(0), on(1));
    let rows = sample();
    let backlog: Vec<(String, Vec<u8>)> = (0..BACKLOG)
        .map(|i| {
            let c = &crowd[i % crowd.len()];
            let v = rows[i % 40].json(&format!("b{i}"), c, T0 + i as i64 * 1000);
            (c.clone(), v.into_bytes())
        })
        .collect();
    let twenty = |prefix: &str| -> Vec<(String, Vec<u8>)> {
        (0..20)
            .map(|i| {
                let c = &few[i];
                let v = rows[i].json(&format!("{prefix}{i}"), c, T0 + i as i64 * 1000);
                (c.clone(), v.into_bytes())
            })
            .collect()
    };
    let p = producer();
    send_all(&p, &t.transactions, &backlog).await;
    send_all(&p, &t.transactions, &twenty("waiting")).await;
    let mut scorer = Scorer::start(&t, &[("FRAUDSTREAM__BATCH__MAX_RECORDS", "200")]);
    let mut reader = Reader::new(&t.verdicts);
    let started = reader
        .read_until_distinct_keys(Duration::from_secs(120), 1_000)
        .await;
    assert!(started, "log:\n{}", scorer.log_text());
    // Sent while the backlog drains: read verdicts before this point came before they were.
    let sent_at = reader.messages.len();
    send_all(&p, &t.transactions, &twenty("live")).await;
    let all = reader
        .read_until_distinct_keys(Duration::from_secs(180), BACKLOG + 40)
        .await;
    assert!(all, "log:\n{}", scorer.log_text());
    let order: Vec<String> = reader
        .messages
        .iter()
        .filter_map(|m| m.key().map(|k| String::from_utf8_lossy(k).into_owned()))
        .collect();
    // Backlog verdicts read between `from` and the last verdict of the twenty.
    let waited = |prefix: &str, from: usize| -> usize {
        let last = order
            .iter()
            .rposition(|k| k.starts_with(prefix))
            .unwrap_or_else(|| panic!("no verdict for {prefix}"));
        order[from.min(last)..last]
            .iter()
            .filter(|k| k.starts_with('b'))
            .count()
    };
    let (waiting, live) = (waited("waiting", 0), waited("live", sent_at));
    eprintln!(
        "backlog verdicts before the last of the 20 waiting: {waiting}; after the 20 live \
         were sent (at verdict {sent_at}) and before the last of them: {live}"
    );
    assert!(
        waiting < BACKLOG / 4,
        "the 20 waiting at start were answered after {waiting} of the backlog"
    );
    assert!(
        live < BACKLOG / 4,
        "the 20 sent while the backlog drained waited for {live} of its verdicts"
    );
    scorer.stop();
}
