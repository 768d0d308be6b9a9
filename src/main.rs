//! The `fraudstream` binary: parses flags, loads settings, runs the library, maps the
//! outcome to an exit code (0 clean shutdown, 1 runtime failure, 2 bad configuration).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use fraudstream::config::Settings;

/// The scorer allocates small, short-lived values per event (decoded records, verdicts,
/// Kafka messages) from several threads; glibc's allocator spent a fifth of the scorer's CPU
/// on them (bench/RESULTS.md, "Where the time goes"). mimalloc serves them from per-thread
/// free lists.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fraudstream",
    version,
    about = "Scores payment transactions for fraud as they stream through Kafka."
)]
struct Cli {
    /// TOML configuration (every key: docs/fraudstream.toml). FRAUDSTREAM__* variables and
    /// --set override it.
    #[arg(
        short = 'c',
        long,
        global = true,
        env = "FRAUDSTREAM_CONFIG",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,
    /// A setting over the file and the environment, as `key.path=value` (repeatable):
    /// `--set batch.max-records=500`, `--set kafka.security.protocol=ssl`.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// How logs are written to standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One line per event, for people.
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Consume transactions, publish verdicts, until SIGTERM or SIGINT.
    Run,
    /// Load and check the configuration and print it resolved, as TOML (secrets redacted).
    CheckConfig,
    /// Report the state store: entities and bytes per entity, by kind. Safe beside a
    /// running scorer (opens read-only).
    StateStats,
    /// Export the state the changelog topic holds (every entity's latest value, as
    /// read_committed readers see it) as sorted `partition key value` lines in hex, to compare
    /// the state of two runs.
    StateExport {
        /// Where to write; `-` is stdout.
        #[arg(long, default_value = "-")]
        output: PathBuf,
    },
    /// Replay historical files (Sparkov CSV, or fraudstream JSON lines of transactions and
    /// navigation events; `-` is stdin) through the feature code, in event-time order, into
    /// a training table (CSV: transaction_id, event_time_ms, label, features).
    Replay {
        /// Input files (repeatable). `.gz` is decompressed; pipe `xzcat` for `.xz`.
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        output: PathBuf,
        /// The transactions topic's partition count online (merchant profiles are per
        /// partition).
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Only these features, comma-separated (default: every named feature).
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Check everything `run` checks at start (config, models, rules, schemas, and the
    /// brokers and topics), list every problem, exit 1 if there is one.
    Validate {
        /// How long to wait for the brokers, in seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// Without a broker: config, models, rules and schemas only.
        #[arg(long)]
        offline: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let config = cli.config.clone();
    let settings = match Settings::load(config.as_deref(), std::env::vars(), &cli.set) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Run => {}
        Command::Replay {
            inputs,
            output,
            partitions,
            features,
            quiet,
        } => {
            // Offline, a table's features do not depend on the key (only on which hashes are
            // equal): without one, the development key serves.
            let secret = match settings.state.secret().or_else(|e| {
                if settings.state.hmac_secret.is_none() {
                    Ok(fraudstream::config::DEV_HMAC_SECRET.to_string())
                } else {
                    Err(e)
                }
            }) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let args = fraudstream::replay::ReplayArgs {
                inputs,
                output: output.clone(),
                partitions,
                features,
                hmac_secret: secret,
                progress: !quiet,
            };
            return match fraudstream::replay::run(&args) {
                Ok((txs, navs)) => {
                    println!(
                        "{txs} transactions ({navs} navigation events) replayed into {}",
                        output.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::StateStats => {
            for w in 0..settings.processing.workers {
                let path = settings.state.worker_path(w);
                let stats =
                    fraudstream::state::Store::open_read_only(&path).and_then(|s| s.stats());
                match stats {
                    Ok(stats) => {
                        println!("state store {}", path.display());
                        for (kind, n, bytes) in stats {
                            let per = if n > 0 { bytes as f64 / n as f64 } else { 0.0 };
                            println!(
                                "{kind:<9} {n:>10} entities {bytes:>14} bytes {per:>10.1} bytes each"
                            );
                        }
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            return ExitCode::SUCCESS;
        }
        Command::StateExport { output } => {
            use fraudstream::pipeline::rebalance::export;
            let result = if output.as_os_str() == "-" {
                export(&settings, &mut std::io::stdout().lock())
            } else {
                std::fs::File::create(output)
                    .map_err(anyhow::Error::from)
                    .and_then(|f| export(&settings, &mut std::io::BufWriter::new(f)))
            };
            return match result {
                Ok(n) => {
                    eprintln!(
                        "{n} entities exported from `{}`",
                        settings.changelog_topic()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::CheckConfig => {
            return match toml::to_string(&settings.redacted()) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: cannot print the configuration: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Validate { timeout, offline } => {
            let brokers = (!offline).then(|| std::time::Duration::from_secs(timeout));
            let findings = fraudstream::validate::validate(&settings, brokers);
            let problems = findings
                .iter()
                .filter(|f| f.level == fraudstream::pipeline::topology::Level::Problem)
                .count();
            println!(
                "ok       config {}",
                config
                    .as_ref()
                    .map_or("(defaults)".into(), |p| p.display().to_string())
            );
            for f in &findings {
                println!("{f}");
            }
            if problems > 0 {
                println!("{problems} problem(s).");
                return ExitCode::FAILURE;
            }
            println!("No problems.");
            return ExitCode::SUCCESS;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        fraudstream::pipeline::run(settings, shutdown).await
    });
    match result {
        Ok(()) => {
            tracing::info!("Stopped cleanly.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Stopped on a fatal error.");
            ExitCode::FAILURE
        }
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT; a second one exits at once.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("Cannot listen for signals; stop with SIGKILL.");
        return;
    };
    for n in 0.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if n == 0 {
            tracing::info!("Signal received; finishing the batch in hand, then stopping.");
            shutdown.cancel();
        } else {
            tracing::warn!("Second signal; exiting without draining.");
            std::process::exit(130);
        }
    }
}
