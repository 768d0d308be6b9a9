//! Stopping mid-stream loses nothing: SIGTERM drains and commits (no duplicates after a
//! restart); SIGKILL and a restart re-deliver, and the repeated verdicts are identical.

use std::collections::HashSet;
use std::time::Duration;

use fraudstream::decision::Verdict;

use crate::util::*;

const N: usize = 20_000;

async fn produce_stream(t: &Topics) {
    let records = sample_stream(N, "s", 200, 1_795_341_600_000, 1);
    send_all(&producer(), &t.transactions, &records).await;
}

/// Small batches so that the stream is still in progress when the signal comes.
const SLOW: [(&str, &str); 1] = [("FRAUDSTREAM__BATCH__MAX_RECORDS", "50")];

fn same_but_scored_at(a: &Verdict, b: &Verdict) -> bool {
    Verdict {
        scored_at: 0,
        ..a.clone()
    } == Verdict {
        scored_at: 0,
        ..b.clone()
    }
}

async fn stop_and_restart(test: &str, signal: &str) -> (Reader, usize) {
    let t = topics(test, 3).await;
    produce_stream(&t).await;
    let mut first = Scorer::start(&t, &SLOW);
    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until(Duration::from_secs(90), |m| m.len() >= 2_000)
            .await,
        "log:\n{}",
        first.log_text()
    );
    first.signal(signal);
    let status = first.wait(Duration::from_secs(30));
    if signal == "TERM" {
        assert!(
            status.success(),
            "exit {status:?}; log:\n{}",
            first.log_text()
        );
        assert!(first.log_text().contains("Committed; leaving the group."));
    }
    reader.drain_for(Duration::from_secs(1)).await;
    let before_restart = reader.messages.len();
    assert!(
        before_restart < N,
        "the stream finished before the {signal}; the test proves nothing"
    );

    let mut second = Scorer::start(&t, &[]);
    let want: HashSet<String> = (0..N).map(|i| format!("s{i}")).collect();
    let complete = reader
        .read_until_distinct_keys(Duration::from_secs(120), N)
        .await;
    assert!(
        complete,
        "after restart: {} ids; log:\n{}",
        verdicts_by_id(&reader.messages).len(),
        second.log_text()
    );
    reader.drain_for(Duration::from_secs(2)).await;
    let by_id = verdicts_by_id(&reader.messages);
    assert_eq!(by_id.keys().cloned().collect::<HashSet<_>>(), want);
    for copies in by_id.values() {
        for c in &copies[1..] {
            assert!(
                same_but_scored_at(&copies[0], c),
                "{:?} vs {:?}",
                copies[0],
                c
            );
        }
    }
    second.stop();
    let duplicates = reader.messages.len() - N;
    (reader, duplicates)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_stream_drains_commits_and_restart_resumes() {
    let (_, duplicates) = stop_and_restart("sigterm", "TERM").await;
    // Everything finished before exit was committed, so the restart re-scores nothing.
    assert_eq!(duplicates, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_and_restart_loses_nothing_and_duplicates_are_identical() {
    let (_, duplicates) = stop_and_restart("sigkill", "KILL").await;
    // Exactly once (the default): the killed instance's open transaction was aborted, so a
    // read_committed reader sees no verdict twice.
    assert_eq!(duplicates, 0);
}
