//! Configuration and model mistakes stop the binary at start with a message that names them.

use std::process::Command;

use crate::util::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fraudstream"));
    cmd.current_dir(repo())
        .args(args)
        .env("FRAUDSTREAM__STATE__HMAC_SECRET", HMAC_SECRET)
        // Not the default `fraudstream-state` in the checkout.
        .env(
            "FRAUDSTREAM__STATE__PATH",
            std::env::temp_dir().join(unique("state")),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run fraudstream");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_key_in_file_or_environment_is_named() {
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[topics]\nverdict = \"v\"\n").unwrap();
    let (code, err) = run(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown field `verdict`"), "{err}");

    let (code, err) = run(&["run"], &[("FRAUDSTREAM__BATCH__MAX_RECORD", "5")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("max-record") && err.contains("FRAUDSTREAM__BATCH__MAX_RECORD"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn manifest_with_an_unknown_feature_is_refused() {
    let path = manifest_with_feature(3, "velocity_1h");
    let port = format!("127.0.0.1:{}", free_port());
    let (code, err) = run(
        &["run", "--config", "docs/fraudstream.toml"],
        &[
            ("FRAUDSTREAM__MODEL__MANIFEST", path.to_str().unwrap()),
            ("FRAUDSTREAM__METRICS__LISTEN", &port),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("unknown feature `velocity_1h` (position 3"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_topic_is_named() {
    let port = format!("127.0.0.1:{}", free_port());
    let missing = unique("no-such-topic");
    let (code, err) = run(
        &["run", "--config", "docs/fraudstream.toml"],
        &[
            ("FRAUDSTREAM__BROKERS", &brokers()),
            ("FRAUDSTREAM__TOPICS__TRANSACTIONS", &missing),
            ("FRAUDSTREAM__METRICS__LISTEN", &port),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("`{missing}`: does not exist")),
        "{err}"
    );
}
