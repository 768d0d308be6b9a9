//! What only a real Apache Kafka broker shows: inputs written by transactional producers
//! (their partitions end with markers no consumer receives), compaction of the blocklist
//! and of the changelog, and a group of two instances with the broker's own rebalance timing.

use std::time::{Duration, Instant};

use crate::util::*;

/// Every input written in Kafka transactions, each partition ending with a commit or an abort
/// marker. The merge is told to wait two minutes for an input that is not caught up, and the
/// global tables must be loaded before scoring: were the markers mistaken for records still
/// to come, the scorer would never be ready, or each purchase would wait out the two minutes.
#[tokio::test(flavor = "multi_thread")]
async fn inputs_written_in_transactions_are_read_to_their_end() {
    let t = topics("txn-inputs", 1).await;
    let rows = sample();
    let p = transactional_producer();
    let block = Some(format!(r#"{{"added_at":{T0},"reason":"test"}}"#));
    let label = Some(format!(
        r#"{{"label_time":{T0},"kind":"fraud","email":"mallory@evil.example"}}"#
    ));
    send_in_transaction(
        &p,
        &[
            (&t.blocklist, "device:dev-c1", block.clone()),
            (&t.labels, "email:mallory@evil.example", label),
        ],
        true,
    )
    .await;
    // Aborted: never applied.
    send_in_transaction(
        &p,
        &[(&t.blocklist, "email_domain:evil.example", block)],
        false,
    )
    .await;
    let navs: Vec<(&str, &str, Option<String>)> = (0..3)
        .map(|i| {
            let v = nav(
                &format!("n{i}"),
                "c1",
                "s1",
                "page_view",
                T0 + i * 1000,
                "dev-c1",
            );
            (t.navigation.as_str(), "c1", Some(v))
        })
        .collect();
    send_in_transaction(&p, &navs, true).await;
    let purchases: Vec<(&str, &str, Option<String>)> = (0..5)
        .map(|i| {
            let v = tx(
                &rows[i as usize],
                &format!("t{i}"),
                "c1",
                "s1",
                "mallory@evil.example",
                T0 + 10_000 + i * 1000,
            );
            (t.transactions.as_str(), "c1", Some(v))
        })
        .collect();
    send_in_transaction(&p, &purchases, true).await;
    let aborted = tx(&rows[9], "aborted", "c1", "s1", "x@y.z", T0 + 20_000);
    send_in_transaction(&p, &[(&t.transactions, "c1", Some(aborted))], false).await;

    let idle = ("FRAUDSTREAM__BATCH__MAX_FETCH_WAIT_MS", "120000");
    let mut scorer = Scorer::start(&t, &[AUDIT, idle]);
    scorer.wait_ready(Duration::from_secs(60)).await;
    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until(Duration::from_secs(30), |m| m.len() >= 5)
            .await,
        "5 verdicts well before the merge's 2 minutes; log:\n{}",
        scorer.log_text()
    );
    reader.drain_for(Duration::from_secs(2)).await;
    let v = verdicts_by_id(&reader.messages);
    assert_eq!(v.len(), 5, "no verdict for the aborted transaction");
    assert!(!v.contains_key("aborted"));
    assert_eq!(
        feature(&v, "t0", "session_events"),
        3.0,
        "committed navigation"
    );
    assert_eq!(
        feature(&v, "t0", "device_blocklisted"),
        1.0,
        "committed entry"
    );
    assert_eq!(
        feature(&v, "t0", "email_fraud_labels"),
        1.0,
        "committed label"
    );
    assert_eq!(
        feature(&v, "t0", "email_domain_blocklisted"),
        0.0,
        "the aborted entry is not applied"
    );
    scorer.stop();
}

/// The blocklist after the broker compacted it: the latest value of each key, tombstones
/// honoured (the tombstone itself may be gone too, with what it deleted).
#[tokio::test(flavor = "multi_thread")]
async fn a_compacted_blocklist_keeps_latest_values_and_honours_tombstones() {
    let t = topics("compact-block", 1).await;
    let blocklist = unique("compact-blocklist");
    create_topics_with(&[(&blocklist, 1, COMPACT_SOON)]).await;
    let t = Topics { blocklist, ..t };
    let p = producer();
    let entry = |reason: &str| format!(r#"{{"added_at":{T0},"reason":"{reason}"}}"#);
    send(
        &p,
        &t.blocklist,
        Some(b"device:dev-c1"),
        Some(entry("first").as_bytes()),
    )
    .await;
    for i in 0..300 {
        let v = entry(&format!("update {i}"));
        send(&p, &t.blocklist, Some(b"device:dev-c2"), Some(v.as_bytes())).await;
        if i % 50 == 0 {
            // Segments roll on the next append after segment.ms.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    send(&p, &t.blocklist, Some(b"device:dev-c1"), None).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    send(
        &p,
        &t.blocklist,
        Some(b"device:dev-c3"),
        Some(entry("last").as_bytes()),
    )
    .await;
    let written = 303;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut kept = read_all(&t.blocklist).len();
    while kept >= written / 2 {
        assert!(
            Instant::now() < deadline,
            "the broker did not compact `{}` ({kept} of {written} records left)",
            t.blocklist
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Appends roll the active segment, so the cleaner can take the rest.
        send(
            &p,
            &t.blocklist,
            Some(b"device:dev-c3"),
            Some(entry("last").as_bytes()),
        )
        .await;
        kept = read_all(&t.blocklist).len();
    }
    eprintln!("blocklist compacted: {kept} records left of {written}+");

    let mut scorer = Scorer::start(&t, &[AUDIT]);
    let rows = sample();
    let mut reader = Reader::new(&t.verdicts);
    for (i, c) in ["c1", "c2", "c3"].iter().enumerate() {
        let v = tx(&rows[i], &format!("t-{c}"), c, "s", "a@b.c", T0 + i as i64);
        send(&p, &t.transactions, Some(c.as_bytes()), Some(v.as_bytes())).await;
    }
    assert!(
        reader
            .read_until(Duration::from_secs(60), |m| m.len() >= 3)
            .await,
        "log:\n{}",
        scorer.log_text()
    );
    let v = verdicts_by_id(&reader.messages);
    assert_eq!(feature(&v, "t-c1", "device_blocklisted"), 0.0, "tombstoned");
    assert_eq!(
        feature(&v, "t-c2", "device_blocklisted"),
        1.0,
        "latest update"
    );
    assert_eq!(feature(&v, "t-c3", "device_blocklisted"), 1.0);
    scorer.stop();
}

/// State restored from a changelog the broker has compacted: an instance with no local state
/// takes over after a first one and continues exactly as one instance that saw everything.
#[tokio::test(flavor = "multi_thread")]
async fn state_restored_from_a_compacted_changelog_continues_as_a_clean_run() {
    let (first, more, customers) = (2_000usize, 300usize, 20usize);
    let all = sample_stream(first + more, "e", customers, T0, 1000);
    let (head, tail) = all.split_at(first);
    let p = producer();

    let clean = topics("compact-clean", 2).await;
    send_all(&p, &clean.transactions, &all).await;
    let mut scorer = Scorer::start(&clean, &[AUDIT]);
    let mut reader = Reader::new(&clean.verdicts);
    assert!(
        reader
            .read_until_distinct_keys(Duration::from_secs(120), all.len())
            .await
    );
    let expected = verdicts_by_id(&reader.messages);
    scorer.stop();

    let t = topics("compact-restore", 2).await;
    let changelog = format!("{}-changelog", t.group);
    // Not compacted until every record a writes has been counted.
    let later = [COMPACT_SOON, &[("min.compaction.lag.ms", "86400000")]].concat();
    create_topics_with(&[(&changelog, 2, &later)]).await;
    // Small batches: many changelog records per entity for the cleaner to remove.
    let small = ("FRAUDSTREAM__BATCH__MAX_RECORDS", "20");
    let mut a = Scorer::start_instance(&t, "a", &[AUDIT, small]);
    let mut reader = Reader::new(&t.verdicts);
    for chunk in head.chunks(200) {
        send_all(&p, &t.transactions, chunk).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        reader
            .read_until_distinct_keys(Duration::from_secs(120), first)
            .await,
        "log:\n{}",
        a.log_text()
    );
    a.stop();
    let written = read_all(&changelog).len();
    set_topic_config(&changelog, COMPACT_SOON).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    // The last segment of each partition stays: wait until the cleaner took from the rest.
    loop {
        let kept = read_all(&changelog).len();
        if kept < written {
            eprintln!("changelog compacted: {kept} records left of {written}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broker did not compact `{changelog}` ({kept} of {written})"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // A new instance, no local state: everything it knows comes from the compacted log.
    let mut b = Scorer::start_instance(&t, "b", &[AUDIT]);
    send_all(&p, &t.transactions, tail).await;
    assert!(
        reader
            .read_until_distinct_keys(Duration::from_secs(120), first + more)
            .await,
        "log:\n{}",
        b.log_text()
    );
    assert!(b.log_text().contains("Restoring state"), "{}", b.log_text());
    let got = verdicts_by_id(&reader.messages);
    for i in first..first + more {
        let id = format!("e{i}");
        assert_eq!(got[&id][0].features, expected[&id][0].features, "{id}");
        assert_eq!(got[&id][0].score, expected[&id][0].score, "{id}");
    }
    b.stop();
}

/// The partitions (tasks: partition p of every input) an instance reports on /metrics.
async fn assigned(s: &Scorer) -> f64 {
    let (_, body) = s.http_get("/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix("fraudstream_assigned_partitions "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Two instances in one group on Kafka's own rebalance protocol: the partitions are split
/// between them, and when one leaves with SIGTERM the other takes everything over at once
/// (a clean leave, not the 45 s session timeout this test sets), every transaction scored.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_split_the_partitions_and_a_leave_hands_them_over() {
    let t = topics("group-two", 4).await;
    let n = 6_000;
    let records = sample_stream(n, "g", 200, T0, 100);
    // librdkafka's default session timeout: only a clean leave is fast.
    let session = ("FRAUDSTREAM__KAFKA_CONSUMER__SESSION_TIMEOUT_MS", "45000");
    let heartbeat = ("FRAUDSTREAM__KAFKA_CONSUMER__HEARTBEAT_INTERVAL_MS", "3000");
    let mut a = Scorer::start_instance(&t, "a", &[session, heartbeat]);
    a.wait_ready(Duration::from_secs(60)).await;
    let producing = produce_paced(&t.transactions, records);
    let mut b = Scorer::start_instance(&t, "b", &[session, heartbeat]);
    // 4 partitions (each with its navigation and repartition partitions): 2 each.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (pa, pb) = (assigned(&a).await, assigned(&b).await);
        if pa == 2.0 && pb == 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partitions not split: a {pa}, b {pb}; log of b:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let left = Instant::now();
    a.stop();
    while assigned(&b).await != 4.0 {
        assert!(
            left.elapsed() < Duration::from_secs(30),
            "b did not take over a's partitions after a's clean leave; log:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("partitions handed over {:?} after SIGTERM", left.elapsed());
    producing.await.unwrap();
    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until_distinct_keys(Duration::from_secs(120), n)
            .await,
        "log of b:\n{}",
        b.log_text()
    );
    let v = verdicts_by_id(&reader.messages);
    for (id, copies) in &v {
        for c in copies {
            assert_eq!(c.score, copies[0].score, "duplicates of {id} are identical");
        }
    }
    assert_eq!(v.len(), n);
    b.stop();
}
