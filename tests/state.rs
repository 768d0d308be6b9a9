//! Per-entity state: stateful features reach the verdict, and state is applied exactly once
//! when the scorer is killed and restarted mid-stream, forwarded records included.

use std::collections::HashMap;
use std::time::Duration;

use fraudstream::decision::Verdict;
use fraudstream::source::partitioner::partition_for;

use crate::util::*;

const AUDIT: (&str, &str) = ("FRAUDSTREAM__OUTPUT__AUDIT_FEATURES", "true");
const T0: i64 = 1_795_341_600_000; // 2026-11-22T10:00:00Z

fn tx_json(row: &SampleRow, id: &str, customer: &str, card: &str, t: i64) -> String {
    row.json(id, customer, t).replace(
        "\"channel\":\"web\"",
        &format!("\"channel\":\"web\",\"card_id\":\"{card}\""),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn stateful_features_reach_the_verdict() {
    let t = topics("features", 1).await;
    let rows = sample();
    let p = producer();
    let sends = [
        ("a1", "alice", "card-1", T0),
        ("a2", "alice", "card-1", T0 + 20_000),
        ("b1", "bob", "card-9", T0 + 30_000),
        ("a3", "alice", "card-2", T0 + 40_000),
        ("a4", "alice", "card-2", T0 + 3 * 3_600_000),
    ];
    for (id, customer, card, time) in sends {
        let v = tx_json(&rows[0], id, customer, card, time);
        send(
            &p,
            &t.transactions,
            Some(customer.as_bytes()),
            Some(v.as_bytes()),
        )
        .await;
    }
    let mut scorer = Scorer::start(&t, &[AUDIT]);
    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until(Duration::from_secs(60), |m| m.len() >= 5)
            .await,
        "log:\n{}",
        scorer.log_text()
    );
    let v = verdicts_by_id(&reader.messages);
    let f = |id: &str, name: &str| v[id][0].features.as_ref().expect("audit features")[name];
    let amount: f32 = rows[0].amount().parse().unwrap();
    assert_eq!(f("a1", "customer_tx_count_1m"), 0.0);
    assert_eq!(f("a1", "seconds_since_last_tx"), -1.0);
    assert_eq!(f("a1", "new_card"), 1.0);
    assert_eq!(f("a2", "customer_tx_count_1m"), 1.0);
    assert_eq!(f("a2", "seconds_since_last_tx"), 20.0);
    assert_eq!(f("a2", "new_card"), 0.0);
    assert_eq!(
        f("b1", "customer_tx_count_1m"),
        0.0,
        "bob has his own state"
    );
    assert_eq!(f("a3", "customer_tx_count_1m"), 2.0);
    assert_eq!(f("a3", "new_card"), 1.0);
    assert_eq!(
        f("a3", "merchant_tx_total"),
        3.0,
        "the merchant saw a1, a2, b1"
    );
    assert!((f("a3", "customer_amount_sum_1h") - 2.0 * amount).abs() < 1e-3);
    assert_eq!(
        f("a4", "customer_tx_count_1m"),
        0.0,
        "event time, not arrival time"
    );
    assert_eq!(f("a4", "customer_tx_count_24h"), 3.0);
    // The model's own inputs are in the audit too.
    assert_eq!(f("a1", "features[29]"), amount);

    // The bytes-per-customer report reads the running scorer's store.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fraudstream"))
        .args(["state-stats"])
        .env("FRAUDSTREAM__STATE__PATH", Scorer::state_dir(&t, "a"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let customers = report.lines().find(|l| l.starts_with("customer")).unwrap();
    let n: u64 = customers
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(n, 2, "alice and bob: {report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("merchant") && l.contains(" 1 entities")),
        "{report}"
    );
    scorer.stop();
}

fn stream(n: usize) -> Vec<(String, Vec<u8>)> {
    let rows = sample();
    (0..n)
        .map(|i| {
            let customer = format!("c{}", i % 150);
            let card = format!("card-{}", (i / 7) % 300);
            let v = tx_json(
                &rows[i % rows.len()],
                &format!("e{i}"),
                &customer,
                &card,
                T0 + i as i64 * 1_000,
            );
            (customer, v.into_bytes())
        })
        .collect()
}

async fn all_verdicts(t: &Topics, n: usize, scorer: &Scorer) -> HashMap<String, Vec<Verdict>> {
    let mut reader = Reader::new(&t.verdicts);
    let ok = reader
        .read_until_distinct_keys(Duration::from_secs(180), n)
        .await;
    assert!(
        ok,
        "{} verdicts; log:\n{}",
        reader.messages.len(),
        scorer.log_text()
    );
    reader.drain_for(Duration::from_secs(1)).await;
    verdicts_by_id(&reader.messages)
}

/// Every verdict of all `n` transactions (duplicates too) has the clean run's features and score.
fn assert_as_clean(
    got: &HashMap<String, Vec<Verdict>>,
    expected: &HashMap<String, Vec<Verdict>>,
    n: usize,
) {
    for (id, copies) in got {
        let want = &expected[id][0];
        for v in copies {
            assert_eq!(
                v.features, want.features,
                "features of {id} differ from the clean run"
            );
            assert_eq!(v.score, want.score, "score of {id}");
        }
    }
    assert_eq!(got.len(), n);
}

#[tokio::test(flavor = "multi_thread")]
async fn state_is_applied_once_when_killed_and_restarted() {
    let n = 20_000;
    let clean = topics("eos-clean", 3).await;
    send_all(&producer(), &clean.transactions, &stream(n)).await;
    // The crash run reads the same input with its own group, state and outputs.
    let crash = {
        let other = topics("eos-crash", 3).await;
        Topics {
            transactions: clean.transactions.clone(),
            ..other
        }
    };

    let mut a = Scorer::start(&clean, &[AUDIT]);
    let expected = all_verdicts(&clean, n, &a).await;
    a.stop();

    let mut first = Scorer::start(&crash, &[AUDIT, ("FRAUDSTREAM__BATCH__MAX_RECORDS", "50")]);
    let mut reader = Reader::new(&crash.verdicts);
    assert!(
        reader
            .read_until(Duration::from_secs(90), |m| m.len() >= 3_000)
            .await
    );
    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    reader.drain_for(Duration::from_millis(500)).await;
    assert!(
        reader.messages.len() < n,
        "finished before the kill; the test proves nothing"
    );

    let second = Scorer::start(&crash, &[AUDIT]);
    let got = all_verdicts(&crash, n, &second).await;
    // Exactly once: what the killed instance had not committed was aborted, invisible to
    // this (read_committed) reader, and scored again from the committed state.
    let twice: Vec<&String> = got
        .iter()
        .filter(|(_, c)| c.len() > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        twice.is_empty(),
        "{} transactions with two verdicts, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    assert_as_clean(&got, &expected, n);
    // The windows really vary, so equality is not trivial.
    let counts: std::collections::HashSet<u32> = expected
        .values()
        .map(|c| c[0].features.as_ref().unwrap()["customer_tx_count_1h"] as u32)
        .collect();
    assert!(counts.len() > 10, "{counts:?}");
}

/// At-least-once forwards records outside the transaction: a crash after their
/// acknowledgement and before the commit forwards them again. Their task skips the copies, so
/// its state changes once and every verdict (duplicates included) is the clean run's.
#[tokio::test(flavor = "multi_thread")]
async fn at_least_once_applies_a_record_forwarded_twice_once() {
    const ALO: (&str, &str) = ("FRAUDSTREAM__PROCESSING__GUARANTEE", "at-least-once");
    // All on partition 0, for customers whose partition is 1 or 2: every one is forwarded.
    let records: Vec<(String, Vec<u8>)> = stream(9_000)
        .into_iter()
        .filter(|(c, _)| partition_for(c.as_bytes(), 3) != 0)
        .collect();
    let n = records.len();
    let clean = topics("alo-clean", 3).await;
    send_all_to(&producer(), &clean.transactions, Some(0), &records).await;
    let crash = {
        let other = topics("alo-crash", 3).await;
        Topics {
            transactions: clean.transactions.clone(),
            ..other
        }
    };

    let mut a = Scorer::start(&clean, &[AUDIT, ALO]);
    let expected = all_verdicts(&clean, n, &a).await;
    a.stop();

    // Aborts itself in its third commit, after the forwards were acknowledged.
    let mut first = Scorer::start(
        &crash,
        &[
            AUDIT,
            ALO,
            ("FRAUDSTREAM__BATCH__MAX_RECORDS", "50"),
            // Its third commit comes before the stream's end (at-least-once commits every
            // second by default).
            ("FRAUDSTREAM__PROCESSING__COMMIT_INTERVAL_MS", "100"),
            ("FRAUDSTREAM_TEST_CRASH", "before-offsets:3"),
        ],
    );
    let status = first.wait(Duration::from_secs(120));
    assert!(!status.success(), "log:\n{}", first.log_text());
    let mut second = Scorer::start(&crash, &[AUDIT, ALO]);
    let got = all_verdicts(&crash, n, &second).await;
    assert_as_clean(&got, &expected, n);

    let forwarded = read_all(&format!("{}-repartition", crash.group)).len();
    assert!(
        forwarded > n,
        "nothing was forwarded twice; the test proves nothing"
    );
    let skipped = second
        .metric("fraudstream_repartition_copies_skipped_total")
        .await;
    assert_eq!(
        skipped as usize,
        forwarded - n,
        "every copy skipped, and nothing else"
    );
    second.stop();
}

/// Each commit runs beside the batches after it, which read the committing batch's state
/// through it until the store has it. With a commit due after every batch of 20 records
/// nearly every batch does: under each guarantee its features must be those of a run with
/// the default commit interval and batch size. All records on one partition of three, so
/// that most are forwarded and their forward marks are read through it too.
#[tokio::test(flavor = "multi_thread")]
async fn state_is_read_through_the_commit_in_flight() {
    let records = stream(6_000);
    let n = records.len();
    let reference = topics("behind-ref", 3).await;
    send_all_to(&producer(), &reference.transactions, Some(0), &records).await;
    let mut a = Scorer::start(&reference, &[AUDIT]);
    let expected = all_verdicts(&reference, n, &a).await;
    a.stop();

    for guarantee in ["exactly-once", "at-least-once"] {
        let t = {
            let other = topics(&format!("behind-{guarantee}"), 3).await;
            Topics {
                transactions: reference.transactions.clone(),
                ..other
            }
        };
        let mut b = Scorer::start(
            &t,
            &[
                AUDIT,
                ("FRAUDSTREAM__PROCESSING__GUARANTEE", guarantee),
                ("FRAUDSTREAM__PROCESSING__COMMIT_INTERVAL_MS", "1"),
                ("FRAUDSTREAM__BATCH__MAX_RECORDS", "20"),
            ],
        );
        let got = all_verdicts(&t, n, &b).await;
        assert_as_clean(&got, &expected, n);
        let commits = b
            .metric("fraudstream_commits_total{result=\"committed\"}")
            .await;
        assert!(
            commits as usize > n / 200,
            "{guarantee}: {commits} commits, too few for the batches to have run beside them"
        );
        b.stop();
    }
}
