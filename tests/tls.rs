//! fraudstream over TLS: a second Apache Kafka broker whose client listener only accepts TLS,
//! certificates made by the test, and librdkafka's TLS settings passed through `[kafka]`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::util::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 and localhost.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=fraudstream-test-ca",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scores_over_tls() {
    let dir = std::env::temp_dir().join(unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    make_certs(&dir);
    let broker = LocalBroker::start_tls(&dir, &dir.join("server.pem"), &dir.join("server.key"));
    let addr = broker.address();
    let ca = dir.join("ca.pem");
    let tls = |c: &mut ClientConfig| {
        c.set("bootstrap.servers", &addr)
            .set("security.protocol", "ssl")
            .set("ssl.ca.location", ca.to_str().unwrap());
    };

    // A plaintext client is refused: the listener really is TLS-only.
    let plain: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &addr)
        .set("message.timeout.ms", "3000")
        .create()
        .unwrap();
    let refused = plain
        .send(
            FutureRecord::<str, str>::to("x").payload("x"),
            Duration::from_secs(5),
        )
        .await;
    assert!(
        refused.is_err(),
        "plaintext produce succeeded against the TLS listener"
    );

    let mut cfg = ClientConfig::new();
    tls(&mut cfg);
    let admin: AdminClient<DefaultClientContext> = cfg.create().unwrap();
    let (tx, verdicts, dlq) = (unique("tls-tx"), unique("tls-verdicts"), unique("tls-dlq"));
    let new = [
        NewTopic::new(&tx, 2, TopicReplication::Fixed(1)),
        NewTopic::new(&verdicts, 1, TopicReplication::Fixed(1)),
        NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
    ];
    for r in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .expect("create topics over TLS")
    {
        r.expect("topic");
    }

    let mut cfg = ClientConfig::new();
    tls(&mut cfg);
    let producer: FutureProducer = cfg.create().unwrap();
    let rows = sample();
    for (i, r) in rows.iter().take(50).enumerate() {
        let v = r.json(&format!("tls{i}"), "c", 1_795_341_600_000);
        producer
            .send(
                FutureRecord::to(&tx).key("c").payload(&v),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce over TLS");
    }

    let t = Topics {
        transactions: tx,
        navigation: String::new(),
        labels: String::new(),
        blocklist: String::new(),
        verdicts: verdicts.clone(),
        dead_letter: dlq,
        group: unique("tls-group"),
    };
    let mut scorer = Scorer::start(
        &t,
        &[
            ("FRAUDSTREAM__BROKERS", &addr),
            ("FRAUDSTREAM__KAFKA__SECURITY_PROTOCOL", "ssl"),
            ("FRAUDSTREAM__KAFKA__SSL_CA_LOCATION", ca.to_str().unwrap()),
        ],
    );

    let mut cfg = ClientConfig::new();
    tls(&mut cfg);
    let reader: StreamConsumer = cfg
        .set("group.id", unique("tls-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[&verdicts]).unwrap();
    let mut ids = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids.len() < 50 && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), reader.recv()).await {
            ids.insert(m.key().unwrap().to_vec());
        }
    }
    assert_eq!(
        ids.len(),
        50,
        "verdicts over TLS; log:\n{}",
        scorer.log_text()
    );
    scorer.stop();
}
