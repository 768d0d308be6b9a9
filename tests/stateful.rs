//! Navigation sessions, global tables, repartitioning and state that follows partitions
//! between instances, against the real broker.

use std::time::Duration;

use fraudstream::source::partitioner::partition_for;

use crate::util::*;

#[tokio::test(flavor = "multi_thread")]
async fn browsing_before_a_purchase_is_seen_in_event_time_order() {
    let t = topics("nav", 2).await;
    let rows = sample();
    let p = producer();
    // The purchases are written first, the browsing after: only the event-time merge puts
    // the page views before the purchase.
    let purchases = [
        ("p1", "alice", "s1", T0 + 60_000),
        ("p2", "bob", "s2", T0 + 60_000),
        ("p3", "carol", "s3", T0 + 60_000),
    ];
    for (id, c, s, time) in purchases {
        let v = tx(&rows[0], id, c, s, "x@example.com", time);
        send(&p, &t.transactions, Some(c.as_bytes()), Some(v.as_bytes())).await;
    }
    let browsing = [
        ("n1", "alice", "s1", "login_failed", T0, "d-a"),
        ("n2", "alice", "s1", "page_view", T0 + 10_000, "d-a"),
        ("n3", "alice", "s1", "product_view", T0 + 20_000, "d-b"),
        ("n4", "alice", "s1", "cart_add", T0 + 30_000, "d-b"),
        ("n5", "alice", "s1", "checkout", T0 + 90_000, "d-b"), // after the purchase
        ("n6", "bob", "s2", "page_view", T0 + 59_999, "d-x"),
        ("n7", "bob", "s-other", "page_view", T0, "d-x"),
    ];
    for (id, c, s, kind, time, dev) in browsing {
        let v = nav(id, c, s, kind, time, dev);
        send(&p, &t.navigation, Some(c.as_bytes()), Some(v.as_bytes())).await;
    }
    let mut scorer = Scorer::start(&t, &[AUDIT]);
    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until(Duration::from_secs(60), |m| m.len() >= 3)
            .await,
        "log:\n{}",
        scorer.log_text()
    );
    reader.drain_for(Duration::from_secs(1)).await;
    assert_eq!(
        reader.messages.len(),
        3,
        "navigation events produce no verdict"
    );
    let v = verdicts_by_id(&reader.messages);
    let f = |id, name| feature(&v, id, name);
    assert_eq!(f("p1", "session_events"), 4.0, "the checkout came later");
    assert_eq!(f("p1", "session_page_views"), 1.0);
    assert_eq!(f("p1", "session_product_views"), 1.0);
    assert_eq!(f("p1", "session_cart_adds"), 1.0);
    assert_eq!(f("p1", "session_failed_logins"), 1.0);
    assert_eq!(f("p1", "session_device_switches"), 1.0);
    assert_eq!(f("p1", "session_age_seconds"), 60.0);
    assert_eq!(f("p2", "session_events"), 1.0, "only bob's session s2");
    assert_eq!(f("p2", "session_age_seconds"), 0.001);
    assert_eq!(f("p3", "session_events"), 0.0, "carol did not browse");
    assert_eq!(f("p3", "session_age_seconds"), -1.0);
    scorer.stop();
}

/// Under a backlog the navigation input is fetched as fast as the merge takes it, so the
/// merge never gives up waiting for browsing that is on the broker: every purchase counts
/// all of its page views. With librdkafka's default fetch pacing (a partition whose queue
/// reached the prefetch limit not fetched again for a second, then behind a fetch held up to
/// half a second at the broker) the merge gave up on the navigation input and scored
/// purchases without their sessions. The prefetch limit is set low here, so that a debug
/// build reaches it as often as a release build does with the default one, and the merge's
/// wait for records on the broker is held to 500 ms (10 s by default), so a stall of the
/// fetching fails the test.
#[tokio::test(flavor = "multi_thread")]
async fn purchases_behind_a_navigation_backlog_count_all_of_their_browsing() {
    const CUSTOMERS: usize = 500;
    const PAGES: usize = 120;
    let t = topics("navbacklog", 2).await;
    let rows = sample();
    let p = producer();
    // 60,000 page views, the customers' interleaved in event time, then the purchases.
    let mut browsing = Vec::with_capacity(CUSTOMERS * PAGES);
    for k in 0..PAGES {
        for c in 0..CUSTOMERS {
            let (customer, session) = (format!("c{c}"), format!("s{c}"));
            let time = T0 + (k * CUSTOMERS + c) as i64;
            let v = nav(
                &format!("n{c}-{k}"),
                &customer,
                &session,
                "page_view",
                time,
                "d",
            );
            browsing.push((customer, v.into_bytes()));
        }
    }
    send_all(&p, &t.navigation, &browsing).await;
    let purchases: Vec<(String, Vec<u8>)> = (0..CUSTOMERS)
        .map(|c| {
            let (customer, session) = (format!("c{c}"), format!("s{c}"));
            let time = T0 + (PAGES * CUSTOMERS + c) as i64;
            let v = tx(
                &rows[0],
                &format!("p{c}"),
                &customer,
                &session,
                "x@example.com",
                time,
            );
            (customer, v.into_bytes())
        })
        .collect();
    send_all(&p, &t.transactions, &purchases).await;
    let prefetch = ("FRAUDSTREAM__KAFKA_CONSUMER__QUEUED_MIN_MESSAGES", "1000");
    let idle = ("FRAUDSTREAM__BATCH__MAX_FETCH_WAIT_MS", "500");
    let mut scorer = Scorer::start(&t, &[AUDIT, prefetch, idle]);
    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until(Duration::from_secs(120), |m| m.len() >= CUSTOMERS)
            .await,
        "log:\n{}",
        scorer.log_text()
    );
    let v = verdicts_by_id(&reader.messages);
    let short: Vec<(usize, f32)> = (0..CUSTOMERS)
        .map(|c| (c, feature(&v, &format!("p{c}"), "session_events")))
        .filter(|&(_, n)| n != PAGES as f32)
        .collect();
    assert!(
        short.is_empty(),
        "{} of {CUSTOMERS} purchases were scored without all {PAGES} page views of their \
         session, e.g. (customer, page views seen) {:?}; log:\n{}",
        short.len(),
        &short[..short.len().min(5)],
        scorer.log_text()
    );
    scorer.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn labels_and_blocklist_affect_the_next_transaction_and_tombstones_lift() {
    let t = topics("global", 1).await;
    let rows = sample();
    let p = producer();
    // Loaded before scoring starts: a label already on the topic counts for the first
    // transaction.
    let label = format!(
        r#"{{"label_time":{},"kind":"fraud","email":"Mallory@Evil.example"}}"#,
        T0 - 1
    );
    send(
        &p,
        &t.labels,
        Some(b"email:mallory@evil.example"),
        Some(label.as_bytes()),
    )
    .await;
    let mut scorer = Scorer::start(&t, &[AUDIT]);
    let mut reader = Reader::new(&t.verdicts);
    let mut n = 0;
    let mut step = |id: &'static str, email: &'static str| {
        n += 1;
        let v = tx(&rows[0], id, "c1", "s", email, T0 + n * 1000);
        (v, n as usize)
    };

    let (v, want) = step("t1", "mallory@evil.example");
    send(&p, &t.transactions, Some(b"c1"), Some(v.as_bytes())).await;
    assert!(
        reader
            .read_until(Duration::from_secs(60), |m| m.len() >= want)
            .await,
        "log:\n{}",
        scorer.log_text()
    );
    let block = format!(r#"{{"added_at":{T0},"reason":"test"}}"#);
    send(
        &p,
        &t.blocklist,
        Some(b"email_domain:evil.example"),
        Some(block.as_bytes()),
    )
    .await;
    send(
        &p,
        &t.blocklist,
        Some(b"device:dev-c1"),
        Some(block.as_bytes()),
    )
    .await;
    // A bad key holding an address: skipped, and never quoted in the log.
    send(
        &p,
        &t.blocklist,
        Some(b"e-mail:Mallory.Bad@Evil.example"),
        Some(block.as_bytes()),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (v, want) = step("t2", "someone@evil.example");
    send(&p, &t.transactions, Some(b"c1"), Some(v.as_bytes())).await;
    assert!(
        reader
            .read_until(Duration::from_secs(30), |m| m.len() >= want)
            .await
    );
    send(&p, &t.blocklist, Some(b"email_domain:evil.example"), None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (v, want) = step("t3", "someone@evil.example");
    send(&p, &t.transactions, Some(b"c1"), Some(v.as_bytes())).await;
    assert!(
        reader
            .read_until(Duration::from_secs(30), |m| m.len() >= want)
            .await
    );

    let v = verdicts_by_id(&reader.messages);
    let f = |id, name| feature(&v, id, name);
    assert_eq!(
        f("t1", "email_fraud_labels"),
        1.0,
        "case-insensitive e-mail"
    );
    assert_eq!(f("t1", "email_domain_blocklisted"), 0.0);
    assert_eq!(f("t2", "email_fraud_labels"), 0.0, "another address");
    assert_eq!(f("t2", "email_domain_blocklisted"), 1.0);
    assert_eq!(f("t2", "device_blocklisted"), 1.0);
    assert_eq!(
        f("t3", "email_domain_blocklisted"),
        0.0,
        "the tombstone lifted it"
    );
    assert_eq!(f("t3", "device_blocklisted"), 1.0);
    let log = scorer.log_text();
    assert!(log.contains("Global-table record skipped"), "{log}");
    assert!(
        !log.to_ascii_lowercase().contains("mallory"),
        "no raw e-mail in the log:\n{log}"
    );
    let (_, metrics) = scorer.http_get("/metrics").await;
    assert!(
        metrics.contains("fraudstream_global_table_entries{table=\"blocklist\"} 1"),
        "{metrics}"
    );
    scorer.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn unkeyed_input_is_rekeyed_by_customer() {
    let t = topics("rekey", 3).await;
    let rows = sample();
    let p = producer();
    let (customers, per) = (10usize, 12usize);
    let mut records = Vec::new();
    for i in 0..customers * per {
        let c = format!("c{}", i % customers);
        let v = tx(
            &rows[i % rows.len()],
            &format!("r{i}"),
            &c,
            "s",
            "a@b.c",
            T0 + i as i64 * 1000,
        );
        records.push(v);
    }
    // No key (as kafka-producer-perf-test sends), or a key that is not the customer. A
    // record that lands on its customer's partition anyway is processed where it is.
    let mut elsewhere = 0;
    for (i, v) in records.iter().enumerate() {
        let key = (i % 2 == 1).then(|| format!("tx-{i}"));
        let (partition, _) = send(
            &p,
            &t.transactions,
            key.as_deref().map(str::as_bytes),
            Some(v.as_bytes()),
        )
        .await;
        let customer = format!("c{}", i % customers);
        if partition != partition_for(customer.as_bytes(), 3) {
            elsewhere += 1;
        }
    }
    assert!(
        elsewhere > 0,
        "every record landed at home; the test proves nothing"
    );
    let mut scorer = Scorer::start(&t, &[AUDIT]);
    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until_distinct_keys(Duration::from_secs(60), records.len())
            .await,
        "log:\n{}",
        scorer.log_text()
    );
    let v = verdicts_by_id(&reader.messages);
    // Every customer's transactions met one state: each saw a different number before it.
    for c in 0..customers {
        let mut totals: Vec<u32> = (0..per)
            .map(|k| feature(&v, &format!("r{}", k * customers + c), "customer_tx_total") as u32)
            .collect();
        totals.sort();
        assert_eq!(totals, (0..per as u32).collect::<Vec<_>>(), "customer c{c}");
    }
    let forwarded = scorer.metric("fraudstream_repartitioned_total").await;
    assert_eq!(forwarded as usize, elsewhere);
    scorer.stop();
}

/// Transactions and navigation events for `customers` customers, one page view or cart add
/// half a second before each purchase, in sessions of 10 purchases.
/// Keyed records to produce.
type Records = Vec<(String, Vec<u8>)>;

fn workload(n: usize, customers: usize) -> (Records, Records) {
    let rows = sample();
    let (mut txs, mut navs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let c = format!("c{}", i % customers);
        let session = format!("s{}", i / (customers * 10));
        let t = T0 + i as i64 * 100;
        let kind = if i % 3 == 0 { "cart_add" } else { "page_view" };
        let device = format!("d{}", i % 7);
        navs.push((
            c.clone(),
            nav(&format!("n{i}"), &c, &session, kind, t - 50, &device).into_bytes(),
        ));
        let v = tx(
            &rows[i % rows.len()],
            &format!("e{i}"),
            &c,
            &session,
            "a@b.c",
            t,
        );
        txs.push((c, v.into_bytes()));
    }
    (txs, navs)
}

async fn run_until(scorer: &Scorer, reader: &mut Reader, n: usize) {
    assert!(
        reader
            .read_until_distinct_keys(Duration::from_secs(240), n)
            .await,
        "log:\n{}",
        scorer.log_text()
    );
}

/// The issue's determinism test: 100,000 transactions and as many navigation events, scored
/// (a) by one instance and (b) by two instances with a rebalance and a SIGKILL mid-stream.
/// Every transaction gets the same features and score: the state followed its partitions
/// through the changelog.
#[tokio::test(flavor = "multi_thread")]
async fn state_follows_partitions_through_rebalances_and_a_kill() {
    let n = 100_000;
    let (txs, navs) = workload(n, 2_000);
    let clean = topics("follow-clean", 4).await;
    let p = producer();
    send_all(&p, &clean.transactions, &txs).await;
    send_all(&p, &clean.navigation, &navs).await;
    // The merge waits for a lagging input instead of guessing: both runs see the same order.
    let idle = ("FRAUDSTREAM__BATCH__MAX_FETCH_WAIT_MS", "60000");
    let mut a = Scorer::start(&clean, &[AUDIT, idle]);
    let mut reader = Reader::new(&clean.verdicts);
    run_until(&a, &mut reader, n).await;
    let expected = verdicts_by_id(&reader.messages);
    a.stop();

    let moved = {
        let other = topics("follow-moved", 4).await;
        Topics {
            transactions: clean.transactions.clone(),
            navigation: clean.navigation.clone(),
            ..other
        }
    };
    let small = ("FRAUDSTREAM__BATCH__MAX_RECORDS", "200");
    let mut reader = Reader::new(&moved.verdicts);
    let mut b1 = Scorer::start_instance(&moved, "b1", &[AUDIT, idle, small]);
    run_until(&b1, &mut reader, n / 5).await;
    // Instance b2 joins: half the partitions move to it, with their state.
    let b2 = Scorer::start_instance(&moved, "b2", &[AUDIT, idle, small]);
    run_until(&b2, &mut reader, n / 2).await;
    b1.signal("KILL");
    b1.wait(Duration::from_secs(10));
    // b2 takes over everything once b1's session times out; then b1 comes back.
    run_until(&b2, &mut reader, n * 7 / 10).await;
    let b1 = Scorer::start_instance(&moved, "b1", &[AUDIT, idle]);
    run_until(&b1, &mut reader, n).await;
    reader.drain_for(Duration::from_secs(2)).await;
    let got = verdicts_by_id(&reader.messages);
    assert_eq!(got.len(), n);
    let restored =
        b1.log_text().contains("State restored") || b2.log_text().contains("State restored");
    assert!(
        restored,
        "a partition moved with its state:\n{}",
        b2.log_text()
    );
    let mut duplicates = 0;
    for (id, copies) in &got {
        let want = &expected[id][0];
        duplicates += copies.len() - 1;
        for v in copies {
            assert_eq!(v.features, want.features, "features of {id}");
            assert_eq!(v.score, want.score, "score of {id}");
        }
    }
    eprintln!("{n} transactions, {duplicates} duplicate verdicts, all identical to the clean run");
    // The clean run merged the inputs in event time: each purchase saw exactly the page
    // views of its session up to and including its own (50 ms before it), none later.
    for i in (0..n).step_by(97) {
        let session_start = i / 20_000 * 20_000;
        let want = ((i - session_start) / 2_000 + 1) as f32;
        let f = expected[&format!("e{i}")][0].features.as_ref().unwrap();
        assert_eq!(f["session_events"], want, "e{i}");
    }
    let browsed: std::collections::HashSet<u32> = expected
        .values()
        .map(|c| c[0].features.as_ref().unwrap()["session_events"] as u32)
        .collect();
    assert!(browsed.len() > 5, "sessions really vary: {browsed:?}");
    drop(b2);
}

/// Offline/online parity: `fraudstream replay` over the file that was produced to Kafka
/// computes the same value of every named feature as the online scorer did.
#[tokio::test(flavor = "multi_thread")]
async fn replay_computes_the_online_features() {
    let (n, customers, partitions) = (3_000, 40, 3);
    let (txs, navs) = workload(n, customers);
    let t = topics("parity-replay", partitions).await;
    let p = producer();
    send_all(&p, &t.transactions, &txs).await;
    send_all(&p, &t.navigation, &navs).await;
    let dir = std::env::temp_dir().join(unique("replay"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = String::new();
    for (_, v) in navs.iter().chain(&txs) {
        text.push_str(std::str::from_utf8(v).unwrap());
        text.push('\n');
    }
    let output = replay(&dir, &text, partitions);

    let idle = ("FRAUDSTREAM__BATCH__MAX_FETCH_WAIT_MS", "60000");
    let mut scorer = Scorer::start(&t, &[AUDIT, idle]);
    let mut reader = Reader::new(&t.verdicts);
    run_until(&scorer, &mut reader, n).await;
    let online = verdicts_by_id(&reader.messages);

    let table = std::fs::read_to_string(&output).unwrap();
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(&header[..3], &["transaction_id", "event_time_ms", "label"]);
    let mut compared = 0;
    for line in lines {
        let cols: Vec<&str> = line.split(',').collect();
        let f = online[cols[0]][0].features.as_ref().unwrap();
        for (name, value) in header[3..].iter().zip(&cols[3..]) {
            let offline: f32 = value.parse().unwrap();
            assert_eq!(offline, f[*name], "{} of {}", name, cols[0]);
        }
        compared += 1;
    }
    assert_eq!(compared, n);
    scorer.stop();
}
