//! What an outsider who can write a transaction can try, and what happens: an absurd amount
//! and an event time from the far future are dead-lettered with their reason, and move
//! nothing (no statistic, no stream time); the partition goes on.

use std::time::Duration;

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
