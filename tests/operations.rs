//! What an operator relies on: consumer lag per partition, readiness that follows the
//! assignment, and no entity identifiers in logs or metric labels.

use std::time::{Duration, Instant};

use crate::util::*;

/// `fraudstream_consumer_lag_messages` values by partition, from a /metrics body.
fn lag_by_partition(metrics: &str, topic: &str) -> Vec<(i32, f64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("fraudstream_consumer_lag_messages{") && l.contains(topic))
        .map(|l| {
            let p = l
                .split("partition=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let v = l.rsplit(' ').next().unwrap();
            (p.parse().unwrap(), v.parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_lag_is_exported_per_partition_and_drains_to_zero() {
    let t = topics("lag", 3).await;
    let mut scorer = Scorer::start(
        &t,
        &[
            ("FRAUDSTREAM__KAFKA_CONSUMER__STATISTICS_INTERVAL_MS", "200"),
            ("FRAUDSTREAM__BATCH__MAX_RECORDS", "20"),
        ],
    );
    while scorer.http_get("/readyz").await.0 != 200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = 20_000;
    let records = sample_stream(n, "l", 300, 1_795_341_600_000, 0);
    send_all(&producer(), &t.transactions, &records).await;

    // While the backlog drains, some sample shows a positive lag.
    let mut reader = Reader::new(&t.verdicts);
    let mut peak = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while reader.messages.len() < n && Instant::now() < deadline {
        let (_, body) = scorer.http_get("/metrics").await;
        peak = peak.max(
            lag_by_partition(&body, &t.transactions)
                .iter()
                .map(|(_, v)| v)
                .sum(),
        );
        reader
            .read_until(Duration::from_millis(100), |m| m.len() >= n)
            .await;
    }
    assert_eq!(reader.messages.len(), n, "log:\n{}", scorer.log_text());
    assert!(
        peak > 0.0,
        "lag never seen above zero while {n} messages drained"
    );

    // Once everything is acknowledged, every partition reports zero.
    let mut last = Vec::new();
    for _ in 0..50 {
        let (_, body) = scorer.http_get("/metrics").await;
        last = lag_by_partition(&body, &t.transactions);
        if last.len() == 3 && last.iter().all(|(_, v)| *v == 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last.sort_by_key(|(p, _)| *p);
    assert_eq!(last, vec![(0, 0.0), (1, 0.0), (2, 0.0)]);
    scorer.stop();
}

/// One partition, two instances: both are ready (the one without a partition is a spare, as
/// a rolling update needs), each says which; when the owner stops, the spare takes the
/// partition over and scores.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_and_health_of_an_owner_and_a_spare() {
    let t = topics("ready", 1).await;
    let mut a = Scorer::start_instance(&t, "a", &[]);
    let mut b = Scorer::start_instance(&t, "b", &[]);
    a.wait_ready(Duration::from_secs(60)).await;
    b.wait_ready(Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut ta, mut tb) = (String::new(), String::new());
    while Instant::now() < deadline {
        ta = a.http_get("/readyz").await.1;
        tb = b.http_get("/readyz").await.1;
        if ta.contains("spare") != tb.contains("spare") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        ta.contains("spare") != tb.contains("spare"),
        "one owner, one spare: a `{ta}`, b `{tb}`"
    );
    let (owner, spare) = if tb.contains("spare") {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let (code, text) = spare.http_get("/healthz").await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("processing loop turned"), "{text}");

    // The owner stops; the spare takes the partition over and scores.
    owner.stop();
    let rows = sample();
    let v = rows[0].json("after-handover", "c", T0);
    send(&producer(), &t.transactions, Some(b"c"), Some(v.as_bytes())).await;
    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until(Duration::from_secs(60), |m| !m.is_empty())
            .await,
        "log:\n{}",
        spare.log_text()
    );
    assert!(spare
        .http_get("/readyz")
        .await
        .1
        .contains("1 partition(s) assigned"));
    spare.stop();
}

/// The admin endpoint needs its token; without `metrics.admin-token` it is off.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_endpoint_needs_its_token_and_is_off_without_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = topics("admin", 1).await;
    let mut on = Scorer::start(&t, &[]);
    on.wait_ready(Duration::from_secs(60)).await;
    let post = |addr: String, auth: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST /admin/reload-model HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    };
    assert!(post(on.metrics.clone(), "")
        .await
        .starts_with("HTTP/1.1 401"));
    assert!(post(on.metrics.clone(), "Authorization: Bearer wrong\r\n")
        .await
        .starts_with("HTTP/1.1 401"));
    assert_eq!(on.http("POST", "/admin/reload-model").await.0, 200);
    on.stop();
    let mut off = Scorer::start_instance(&t, "off", &[("FRAUDSTREAM__METRICS__ADMIN_TOKEN", "")]);
    off.wait_ready(Duration::from_secs(60)).await;
    let (code, text) = off.http("POST", "/admin/reload-model").await;
    assert_eq!(code, 404, "{text}");
    assert!(text.contains("off"), "{text}");
    off.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn no_entity_identifier_reaches_logs_or_metric_labels() {
    let t = topics("pii", 2).await;
    let mut scorer = Scorer::start(&t, &[("RUST_LOG", "debug,librdkafka=info,rdkafka=info")]);
    let rows = sample();
    let p = producer();
    let mut n_good = 0;
    for (i, r) in rows.iter().take(20).enumerate() {
        let good = r
            .json(&format!("TXSECRET-{i}"), "CUSTSECRET-1", 1_795_341_600_000)
            .replace(
                "\"channel\":\"web\"",
                "\"channel\":\"web\",\"email\":\"EMAILSECRET@example.com\",\"card_id\":\"CARDSECRET-4111\",\"device_id\":\"DEVSECRET\",\"ip\":\"203.0.113.77\"",
            );
        send(
            &p,
            &t.transactions,
            Some(b"CUSTSECRET-1"),
            Some(good.as_bytes()),
        )
        .await;
        n_good += 1;
        // And a bad one carrying the same identifiers, which is dead-lettered.
        let bad = good.replace("\"currency\":\"EUR\"", "\"currency\":\"CARDSECRET-4111\"");
        send(
            &p,
            &t.transactions,
            Some(b"CUSTSECRET-1"),
            Some(bad.as_bytes()),
        )
        .await;
    }
    let mut verdicts = Reader::new(&t.verdicts);
    assert!(
        verdicts
            .read_until(Duration::from_secs(60), |m| m.len() >= n_good)
            .await
    );
    let mut dlq = Reader::new(&t.dead_letter);
    assert!(
        dlq.read_until(Duration::from_secs(30), |m| m.len() >= 20)
            .await
    );
    let (_, metrics) = scorer.http_get("/metrics").await;
    scorer.stop();

    let log = scorer.log_text();
    assert!(
        log.contains("Messages dead-lettered."),
        "the log was captured:\n{log}"
    );
    for text in [&log, &metrics] {
        for secret in ["SECRET", "203.0.113.77"] {
            assert!(!text.contains(secret), "`{secret}` leaked into:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_stack_and_dashboard_match_what_the_scorer_exports() {
    let t = topics("compose", 2).await;
    let mut scorer = Scorer::start(
        &t,
        &[("FRAUDSTREAM__KAFKA_CONSUMER__STATISTICS_INTERVAL_MS", "200")],
    );
    let rows = sample();
    let p = producer();
    for (i, r) in rows.iter().take(20).enumerate() {
        let v = r.json(&format!("d{i}"), "c", 1_795_341_600_000);
        send(&p, &t.transactions, Some(b"c"), Some(v.as_bytes())).await;
    }
    send(&p, &t.transactions, Some(b"c"), Some(b"not json")).await;
    let mut verdicts = Reader::new(&t.verdicts);
    assert!(
        verdicts
            .read_until(Duration::from_secs(60), |m| m.len() >= 20)
            .await
    );
    // Every metric has been touched once the lag gauge appears.
    let mut body = String::new();
    for _ in 0..50 {
        body = scorer.http_get("/metrics").await.1;
        if body.contains("fraudstream_consumer_lag_messages{")
            && body.contains("fraudstream_dead_letters_total{")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let file = std::env::temp_dir().join(unique("metrics"));
    std::fs::write(&file, &body).unwrap();
    let python =
        std::env::var("FRAUDSTREAM_PYTHON").expect("FRAUDSTREAM_PYTHON (scripts/test sets it)");
    let out = std::process::Command::new(python)
        .arg(repo().join("scripts/py/check_compose.py"))
        .arg("--repo")
        .arg(repo())
        .arg("--metrics")
        .arg(&file)
        .output()
        .unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("16 dashboard metrics checked"), "{report}");
    scorer.stop();
}

/// The Kubernetes manifests against the Kubernetes API schemas and KEDA's, offline
/// (`scripts/py/check_manifests.py`), and a broken copy refused.
#[test]
fn kubernetes_manifests_validate() {
    let python =
        std::env::var("FRAUDSTREAM_PYTHON").expect("FRAUDSTREAM_PYTHON (scripts/test sets it)");
    let check = |dir: &std::path::Path| {
        std::process::Command::new(&python)
            .arg(repo().join("scripts/py/check_manifests.py"))
            .arg("--repo")
            .arg(repo())
            .arg("--dir")
            .arg(dir)
            .output()
            .unwrap()
    };
    let out = check(&repo().join("deploy/kubernetes"));
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{report}");
    assert!(report.contains("0 problem(s)"), "{report}");

    let broken = std::env::temp_dir().join(unique("manifests"));
    std::fs::create_dir_all(&broken).unwrap();
    for entry in std::fs::read_dir(repo().join("deploy/kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, broken.join(path.file_name().unwrap())).unwrap();
    }
    let statefulset = broken.join("statefulset.yaml");
    let text = std::fs::read_to_string(&statefulset).unwrap();
    let text = text.replacen("imagePullPolicy:", "imagePullPolicyy:", 1);
    std::fs::write(&statefulset, text).unwrap();
    let out = check(&broken);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("imagePullPolicyy"), "{report}");
}
