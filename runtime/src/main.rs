//! The `outpost` gateway binary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use argh::FromArgs;
use outpost::config::Config;
use outpost::config::ConfigError;
use outpost::config::LogFormat;
use outpost::governance::{HistoryEvent, Registry, Trust};
use outpost::ingest::file::FileFormat;
use outpost::pipeline::{self, Prepared};
use tokio_util::sync::CancellationToken;

/// Edge inference runtime: sensor readings in, aggregates out.
#[derive(FromArgs)]
struct Cli {
    #[argh(subcommand)]
    command: Command,
}

#[derive(Clone, Copy)]
enum Format {
    Jsonl,
    Csv,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "jsonl" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            other => Err(format!("unknown format {other:?} (jsonl, csv)")),
        }
    }
}

/// The default configuration file: `$OUTPOST_CONFIG`, else `/etc/outpost/outpost.toml`.
fn config_or_default(config: Option<PathBuf>) -> PathBuf {
    config
        .or_else(|| std::env::var_os("OUTPOST_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| "/etc/outpost/outpost.toml".into())
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Run(Run),
    Check(Check),
    Replay(Replay),
    Status(Status),
    Reload(Reload),
    Models(Models),
    Audit(Audit),
    Deadletter(Deadletter),
    Privacy(Privacy),
    Version(Version),
}

/// What the privacy policy lets leave the site, and what an observer of
/// the cloud learns.
#[derive(FromArgs)]
#[argh(subcommand, name = "privacy")]
struct Privacy {
    #[argh(subcommand)]
    command: PrivacyCommand,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum PrivacyCommand {
    Report(PrivacyReport),
}

/// For a configuration and its model: every field that can leave the site
/// and in which message, exact or noised; the group names and topics an
/// observer sees; epsilon per release and per period; k; what is
/// suppressed; what remains observable, with its bound.
#[derive(FromArgs)]
#[argh(subcommand, name = "report")]
struct PrivacyReport {
    /// configuration file (TOML)
    #[argh(option, short = 'c')]
    config: PathBuf,
    /// print JSON instead of plain text
    #[argh(switch)]
    json: bool,
}

/// Run the gateway. Without --config: the embedded default (simulated
/// source, bundled model, no cloud: aggregates are logged).
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct Run {
    /// configuration file (TOML)
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// Validate a configuration; print every problem with its path.
#[derive(FromArgs)]
#[argh(subcommand, name = "check")]
struct Check {
    /// configuration file (TOML)
    #[argh(option, short = 'c')]
    config: PathBuf,
}

/// Run the pipeline over recorded readings and print the aggregates as
/// JSON Lines. Deterministic; needs no broker.
#[derive(FromArgs)]
#[argh(subcommand, name = "replay")]
struct Replay {
    /// configuration file (its sources, uplink and decisions are ignored)
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
    /// recorded readings, or `-` for stdin
    #[argh(option, short = 'i')]
    input: PathBuf,
    /// input format, jsonl or csv (default: from the extension; `.csv` is
    /// CSV, else JSON Lines)
    #[argh(option)]
    format: Option<Format>,
}

/// Summarize the running gateway: read its `/status` on the metrics
/// endpoint. Exit status 0 when it runs, 3 when it answers but is not
/// ready (starting or draining), 1 when it cannot be reached.
#[derive(FromArgs)]
#[argh(subcommand, name = "status")]
struct Status {
    /// the gateway's configuration, for its `metrics.listen`
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
    /// the metrics endpoint (default: the configuration's, else
    /// 127.0.0.1:9464)
    #[argh(option)]
    addr: Option<String>,
    /// print the JSON status instead of the summary
    #[argh(switch)]
    json: bool,
}

/// Apply a changed configuration file to the running gateway (as SIGHUP
/// does): it is checked first (every problem printed, nothing applied when
/// there is any); then the gateway applies it live where it can, or drains
/// and restarts its pipeline on it, or goes back to the configuration that
/// ran when the new one cannot start. Exit status 0 when applied (or
/// unchanged), 1 when refused or rolled back, 2 when the gateway cannot be
/// reached.
#[derive(FromArgs)]
#[argh(subcommand, name = "reload")]
struct Reload {
    /// the gateway's configuration file (default: $OUTPOST_CONFIG, else
    /// /etc/outpost/outpost.toml); the gateway reads the file it was
    /// started with, this one is checked here first and gives the
    /// endpoint's address
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
    /// the local endpoint (default: the configuration's metrics.listen,
    /// else 127.0.0.1:9464)
    #[argh(option)]
    addr: Option<String>,
}

/// Model governance: publisher keys, signatures, the registry.
#[derive(FromArgs)]
#[argh(subcommand, name = "models")]
struct Models {
    #[argh(subcommand)]
    command: ModelsCommand,
}

/// The hash-chained audit log.
#[derive(FromArgs)]
#[argh(subcommand, name = "audit")]
struct Audit {
    #[argh(subcommand)]
    command: AuditCommand,
}

/// Print the version, git commit and enabled backends.
#[derive(FromArgs)]
#[argh(subcommand, name = "version")]
struct Version {}

#[derive(FromArgs)]
#[argh(subcommand)]
enum ModelsCommand {
    Keygen(Keygen),
    Sign(Sign),
    Verify(Verify),
    Install(Install),
    List(List),
    Shadow(Shadow),
    Promote(Promote),
    Rollback(Rollback),
    Reject(Reject),
}

/// Create a publisher key pair (ed25519); the secret file is mode 0600.
#[derive(FromArgs)]
#[argh(subcommand, name = "keygen")]
struct Keygen {
    /// secret key file to create
    #[argh(option)]
    secret: PathBuf,
    /// public key file to create (give it to operators for
    /// governance.trusted_keys)
    #[argh(option)]
    public: PathBuf,
}

/// Sign an artifact directory (publishers): checks every file's hash
/// against the manifest, then writes manifest.sig.
#[derive(FromArgs)]
#[argh(subcommand, name = "sign")]
struct Sign {
    /// secret key file
    #[argh(option)]
    key: PathBuf,
    /// the artifact directory
    #[argh(positional)]
    dir: PathBuf,
}

/// Verify an artifact (operators): its signature against trusted keys, and
/// every file's hash. Exit status 1 when it does not verify.
#[derive(FromArgs)]
#[argh(subcommand, name = "verify")]
struct Verify {
    /// the artifact directory
    #[argh(positional)]
    dir: PathBuf,
    /// a trusted public key file (repeat for several); default: the
    /// configuration's governance.trusted_keys
    #[argh(option, long = "trusted-key")]
    trusted_keys: Vec<PathBuf>,
    /// the gateway's configuration, for its trusted keys
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// Verify an artifact and copy it into the registry (not activated).
#[derive(FromArgs)]
#[argh(subcommand, name = "install")]
struct Install {
    /// the artifact directory
    #[argh(positional)]
    dir: PathBuf,
    /// the gateway's configuration (default: $OUTPOST_CONFIG, else
    /// /etc/outpost/outpost.toml)
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// Installed versions, what runs, and the history of changes.
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct List {
    /// the gateway's configuration (default: $OUTPOST_CONFIG, else
    /// /etc/outpost/outpost.toml)
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
    /// print the registry state as JSON
    #[argh(switch)]
    json: bool,
}

/// Run an installed version in shadow beside the active model.
#[derive(FromArgs)]
#[argh(subcommand, name = "shadow")]
struct Shadow {
    /// the version, name@version
    #[argh(positional)]
    version: String,
    /// the gateway's configuration (default: $OUTPOST_CONFIG, else
    /// /etc/outpost/outpost.toml)
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// Make a version active (default: the candidate in shadow); the one it
/// replaces runs in shadow during the probation.
#[derive(FromArgs)]
#[argh(subcommand, name = "promote")]
struct Promote {
    /// the version, name@version; default: the candidate
    #[argh(positional)]
    version: Option<String>,
    /// the gateway's configuration (default: $OUTPOST_CONFIG, else
    /// /etc/outpost/outpost.toml)
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// Go back to the version active before this one.
#[derive(FromArgs)]
#[argh(subcommand, name = "rollback")]
struct Rollback {
    /// why (recorded in the history and the audit log)
    #[argh(option, default = "String::from(\"operator rollback\")")]
    reason: String,
    /// the gateway's configuration (default: $OUTPOST_CONFIG, else
    /// /etc/outpost/outpost.toml)
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// Stop the candidate's shadow run.
#[derive(FromArgs)]
#[argh(subcommand, name = "reject")]
struct Reject {
    /// why
    #[argh(option, default = "String::from(\"operator rejection\")")]
    reason: String,
    /// the gateway's configuration (default: $OUTPOST_CONFIG, else
    /// /etc/outpost/outpost.toml)
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum AuditCommand {
    AuditVerify(AuditVerify),
}

/// Check the whole hash chain; say where it was edited, cut, extended or
/// reordered. Exit status 1 when it does not verify.
#[derive(FromArgs)]
#[argh(subcommand, name = "verify")]
struct AuditVerify {
    /// the audit log file; default: the configuration's
    #[argh(option)]
    log: Option<PathBuf>,
    /// the gateway's configuration, for its audit log
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// The dead-letter store: aggregates the cloud broker kept refusing, set
/// aside so that what came behind them was delivered.
#[derive(FromArgs)]
#[argh(subcommand, name = "deadletter")]
struct Deadletter {
    #[argh(subcommand)]
    command: DeadletterCommand,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum DeadletterCommand {
    List(DeadletterList),
    Resend(DeadletterResend),
}

/// List the entries, oldest first: number, when, group, aggregate id,
/// failed attempts, size, reason, and whether a resend is asked for.
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct DeadletterList {
    /// the gateway's configuration (default: $OUTPOST_CONFIG, else
    /// /etc/outpost/outpost.toml), for the store's directory
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
    /// the store's directory (instead of the configuration's)
    #[argh(option)]
    dir: Option<PathBuf>,
    /// print JSON instead of a table
    #[argh(switch)]
    json: bool,
}

/// Ask for entries to be sent again: the running gateway puts them back in
/// its outbox within a second (a stopped one at its next start), and they
/// leave the store once the outbox holds them.
#[derive(FromArgs)]
#[argh(subcommand, name = "resend")]
struct DeadletterResend {
    /// the gateway's configuration (default: $OUTPOST_CONFIG, else
    /// /etc/outpost/outpost.toml), for the store's directory
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
    /// the store's directory (instead of the configuration's)
    #[argh(option)]
    dir: Option<PathBuf>,
    /// every entry
    #[argh(switch)]
    all: bool,
    /// the entry's number (from `outpost deadletter list`)
    #[argh(positional)]
    id: Option<u64>,
}

/// The dead-letter store's directory: `dir`, else the configuration's.
fn deadletter_dir(config: Option<PathBuf>, dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(d) = dir {
        return Ok(d);
    }
    let path = config_or_default(config);
    let cfg = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let state_dir = &cfg.gateway.state_dir;
    Ok(cfg.uplink.as_ref().map_or_else(
        || state_dir.join("deadletter"),
        |u| u.deadletter_dir(state_dir),
    ))
}

fn deadletter_command(command: DeadletterCommand) -> anyhow::Result<ExitCode> {
    use outpost_storage::deadletter;
    match command {
        DeadletterCommand::List(DeadletterList { config, dir, json }) => {
            let dir = deadletter_dir(config, dir)?;
            let entries = deadletter::list(&dir)
                .with_context(|| format!("cannot read the dead-letter store {}", dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(ExitCode::SUCCESS);
            }
            if entries.is_empty() {
                println!("no dead-letter entries in {}", dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            println!("ENTRY  SET ASIDE (UTC)       GROUP  ID  ATTEMPTS  BYTES  RESEND  REASON");
            for e in entries {
                let when = chrono::DateTime::from_timestamp_millis(e.set_aside_ms)
                    .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_else(|| e.set_aside_ms.to_string());
                println!(
                    "{}  {when}  {}  {}  {}  {}  {}  {}",
                    e.id,
                    e.stream,
                    e.record_id,
                    e.attempts,
                    e.bytes,
                    if e.resend { "asked" } else { "-" },
                    e.reason
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadletterCommand::Resend(DeadletterResend {
            config,
            dir,
            all,
            id,
        }) => {
            let dir = deadletter_dir(config, dir)?;
            let asked = match (id, all) {
                (Some(_), true) | (None, false) => {
                    anyhow::bail!("give an entry number or --all")
                }
                (Some(id), false) => {
                    if deadletter::request_resend(&dir, id)? {
                        vec![id]
                    } else {
                        println!("entry {id}: a resend was asked for already");
                        Vec::new()
                    }
                }
                (None, true) => deadletter::request_resend_all(&dir)?,
            };
            for id in &asked {
                println!("entry {id}: resend asked for");
            }
            println!(
                "{} entries to send again; the gateway puts them back in its outbox",
                asked.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => {
            // The embedded demo only logs its aggregates: nothing to keep on disk.
            let mut cfg = Config::default();
            cfg.outbox.kind = outpost::outbox::OutboxKind::Memory;
            cfg.governance.enabled = false;
            cfg.audit.enabled = false;
            Ok(cfg)
        }
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    token.cancel();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn main() -> ExitCode {
    // `outpost --version` as well as `outpost version`.
    if matches!(std::env::args().nth(1).as_deref(), Some("--version" | "-V"))
        && std::env::args().len() == 2
    {
        return real_main(Cli {
            command: Command::Version(Version {}),
        })
        .map_or(ExitCode::FAILURE, |c| c);
    }
    let cli: Cli = argh::from_env();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Version(Version {}) => {
            println!("outpost {}", env!("CARGO_PKG_VERSION"));
            println!(
                "commit {}",
                option_env!("OUTPOST_GIT_COMMIT").unwrap_or(env!("OUTPOST_BUILD_COMMIT"))
            );
            println!("backends cpu(flex)");
            println!("model {}", bundled_model_id());
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(Check { config }) => match Config::load(&config) {
            Ok(cfg) => match Prepared::new(cfg) {
                Ok(p) => {
                    println!(
                        "{}: ok ({} source(s), model {}, window {}/{})",
                        config.display(),
                        p.cfg.sources.len(),
                        p.model.manifest().id(),
                        p.spec.size,
                        p.spec.hop
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{}: model: {e}", config.display());
                    Ok(ExitCode::FAILURE)
                }
            },
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Run(Run { config }) => {
            let cfg = load_config(config.as_ref())?;
            init_logging(&cfg);
            let rt = runtime()?;
            let report = rt.block_on(async {
                let token = CancellationToken::new();
                tokio::spawn(shutdown_signal(token.clone()));
                outpost::supervisor::run(config, cfg, token).await
            })?;
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            let _ = report;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(Status { config, addr, json }) => {
            if addr.is_some() && config.is_some() {
                anyhow::bail!("give --config or --addr, not both");
            }
            let addr = match (addr, config) {
                (Some(a), _) => a,
                (None, Some(path)) => Config::load(&path)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .metrics
                    .listen
                    .unwrap_or_else(|| outpost::metrics::DEFAULT_METRICS_LISTEN.into()),
                (None, None) => outpost::metrics::DEFAULT_METRICS_LISTEN.into(),
            };
            let body = http_get(&addr, "/status").with_context(|| {
                format!("cannot read the gateway's status at http://{addr}/status (is it running, with its metrics endpoint there?)")
            })?;
            let status: outpost::status::Status = serde_json::from_str(&body)
                .with_context(|| format!("http://{addr}/status did not answer with a status"))?;
            if json {
                println!("{}", body.trim_end());
            } else {
                print!("{}", status.human());
            }
            Ok(match status.state {
                outpost::status::GatewayState::Running => ExitCode::SUCCESS,
                _ => ExitCode::from(3),
            })
        }
        Command::Reload(Reload { config, addr }) => {
            let config = config_or_default(config);
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    eprintln!("refused here: nothing was sent to the gateway");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let addr = addr.unwrap_or_else(|| {
                cfg.metrics
                    .listen
                    .clone()
                    .unwrap_or_else(|| outpost::metrics::DEFAULT_METRICS_LISTEN.into())
            });
            // The gateway drains before it answers: up to twice its shutdown timeout.
            let wait = std::time::Duration::from_millis(cfg.gateway.shutdown_timeout_ms * 2)
                + std::time::Duration::from_secs(60);
            match http_request(&addr, "POST", "/reload", wait) {
                Ok((status, body)) => {
                    print!("{body}");
                    Ok(if status == 200 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                Err(e) => {
                    eprintln!("cannot reach the gateway at http://{addr}/reload: {e:#}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::Models(Models { command }) => models_command(command),
        Command::Deadletter(Deadletter { command }) => deadletter_command(command),
        Command::Privacy(Privacy {
            command: PrivacyCommand::Report(PrivacyReport { config, json }),
        }) => {
            let cfg = Config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let p = Prepared::new(cfg).with_context(|| format!("{}: model", config.display()))?;
            let report = outpost::privacy_report::report(&p.cfg, p.model.manifest());
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(Audit {
            command: AuditCommand::AuditVerify(AuditVerify { log, config }),
        }) => {
            let path = match (log, config) {
                (Some(_), Some(_)) => anyhow::bail!("give --log or --config, not both"),
                (Some(l), None) => l,
                (None, c) => {
                    let c = c.unwrap_or_else(|| "/etc/outpost/outpost.toml".into());
                    let cfg = Config::load(&c).map_err(|e| anyhow::anyhow!("{e}"))?;
                    cfg.audit.path(&cfg.gateway.state_dir)
                }
            };
            let report = outpost::audit::verify(&path)
                .with_context(|| format!("cannot read the audit log {}", path.display()))?;
            println!("{}: {report}", path.display());
            // A chain that starts over is whole, but says a break happened.
            if let Some(first) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.lines().next().map(str::to_string))
                .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
                && first["kind"] == outpost::audit::kinds::AUDIT_RESTARTED
            {
                println!(
                    "note: this chain was started over at start-up ({}); the log before it was kept as {}",
                    first["data"]["reason"].as_str().unwrap_or("?"),
                    first["data"]["previous_log"].as_str().unwrap_or("?")
                );
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Replay(Replay {
            config,
            input,
            format,
        }) => {
            let cfg = load_config(config.as_ref())?;
            init_logging(&cfg);
            let format = match format {
                Some(Format::Csv) => FileFormat::Csv,
                Some(Format::Jsonl) => FileFormat::Jsonl,
                None if input.extension().is_some_and(|e| e == "csv") => FileFormat::Csv,
                None => FileFormat::Jsonl,
            };
            let prepared = Prepared::new(cfg)?;
            let rt = runtime()?;
            let metrics = rt.block_on(async {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                pipeline::replay(prepared, input, format, &mut out).await
            })?;
            let rejected: u64 = outpost::ingest::reading::RejectReason::ALL
                .iter()
                .map(|r| metrics.rejected_total(r.as_str()))
                .sum();
            tracing::info!(
                windows = metrics.windows.get(),
                aggregates = metrics.aggregates.get(),
                rejected,
                "replay done"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn registry_of(config: Option<PathBuf>) -> anyhow::Result<(Config, Registry)> {
    let cfg = Config::load(&config_or_default(config)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let registry = Registry::open(&cfg.governance.registry_dir(&cfg.gateway.state_dir))?;
    Ok((cfg, registry))
}

fn trust_of(cfg: &Config) -> anyhow::Result<Trust> {
    Ok(Trust::from_config(&cfg.governance)?)
}

fn print_event(ev: &HistoryEvent) {
    let from = ev
        .from
        .as_deref()
        .map(|f| format!(" (was {f})"))
        .unwrap_or_default();
    let model = ev.model.as_deref().unwrap_or("-");
    println!("{} {model}{from}", ev.action);
}

fn models_command(command: ModelsCommand) -> anyhow::Result<ExitCode> {
    use outpost_models::signing;
    match command {
        ModelsCommand::Keygen(Keygen { secret, public }) => {
            let key_id = signing::generate_keypair(&secret, &public)?;
            println!(
                "key {key_id}: secret {} (keep it offline), public {}",
                secret.display(),
                public.display()
            );
        }
        ModelsCommand::Sign(Sign { key, dir }) => {
            let key = signing::read_secret_key(&key)?;
            let sig = signing::sign_artifact(&dir, &key)?;
            println!("signed {} with key {}", dir.display(), sig.key_id);
        }
        ModelsCommand::Verify(Verify {
            dir,
            trusted_keys,
            config,
        }) => {
            let keys = if trusted_keys.is_empty() {
                let path = config.unwrap_or_else(|| "/etc/outpost/outpost.toml".into());
                let cfg = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
                trust_of(&cfg)?.keys
            } else {
                trusted_keys
                    .iter()
                    .map(|p| signing::read_public_key(p))
                    .collect::<Result<Vec<_>, _>>()?
            };
            if keys.is_empty() {
                anyhow::bail!("no trusted key: give --trusted-key or set governance.trusted_keys");
            }
            match signing::verify_artifact(&dir, &keys) {
                Ok(v) => {
                    println!(
                        "ok: {} is {} signed by trusted key {}, {} file(s) match the manifest",
                        dir.display(),
                        v.manifest.id(),
                        v.key_id,
                        v.manifest.files.len()
                    );
                }
                Err(e) => {
                    eprintln!("refused: {}: {e}", dir.display());
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        ModelsCommand::Install(Install { dir, config }) => {
            let (cfg, registry) = registry_of(config)?;
            let trust = trust_of(&cfg)?;
            if !trust.require_signature {
                eprintln!(
                    "warning: governance.require_signature is off: installing without a signature check"
                );
            }
            let id = registry.install(&dir, &trust)?;
            println!("installed {id} in {}", registry.dir().display());
        }
        ModelsCommand::List(List { config, json }) => {
            let (_, registry) = registry_of(config)?;
            let state = registry.state()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                println!("active    {}", state.active_id());
                println!("candidate {}", state.candidate.as_deref().unwrap_or("-"));
                if let Some(b) = &state.probation {
                    println!("probation (baseline {b} in shadow)");
                }
                println!("installed:");
                for v in registry.versions()? {
                    println!("  {v}");
                }
                println!("history:");
                for h in &state.history {
                    print!("  {:>4} ", h.n);
                    print_event(h);
                }
            }
        }
        ModelsCommand::Shadow(Shadow { version, config }) => {
            let (_, registry) = registry_of(config)?;
            if !registry.versions()?.contains(&version) {
                anyhow::bail!("{version} is not installed (outpost models install DIR)");
            }
            let (ev, _) = registry.update(|s| s.shadow(&version, "cli"))?;
            print_event(&ev);
        }
        ModelsCommand::Promote(Promote { version, config }) => {
            let (cfg, registry) = registry_of(config)?;
            if let Some(v) = &version
                && v != outpost::governance::CONFIGURED
                && !registry.versions()?.contains(v)
            {
                anyhow::bail!("{v} is not installed (outpost models install DIR)");
            }
            let probation = cfg.governance.probation_windows > 0;
            let (ev, _) = registry.update(|s| s.promote(version.as_deref(), probation, "cli"))?;
            print_event(&ev);
        }
        ModelsCommand::Rollback(Rollback { reason, config }) => {
            let (_, registry) = registry_of(config)?;
            let (ev, _) = registry.update(|s| s.rollback(&reason, "cli"))?;
            print_event(&ev);
        }
        ModelsCommand::Reject(Reject { reason, config }) => {
            let (_, registry) = registry_of(config)?;
            let (ev, _) = registry.update(|s| s.reject_candidate(&reason, "cli"))?;
            print_event(&ev);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bundled_model_id() -> String {
    serde_json::from_slice::<serde_json::Value>(outpost_models::bundled::MANIFEST)
        .ok()
        .and_then(|m| {
            Some(format!(
                "{}@{}",
                m.get("name")?.as_str()?,
                m.get("version")?.as_str()?
            ))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A plain HTTP/1.1 GET on loopback (the metrics endpoint); the body of a
/// 200 answer.
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let (status, body) = http_request(addr, "GET", path, std::time::Duration::from_secs(5))?;
    if status != 200 {
        anyhow::bail!("HTTP answer: {status}");
    }
    Ok(body)
}

/// One request to the local endpoint: (status code, body).
fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let sock_addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{addr}: no address"))?;
    let mut sock = std::net::TcpStream::connect_timeout(&sock_addr, timeout)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    write!(
        sock,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    sock.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("incomplete HTTP answer"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP answer: {status_line}"))?;
    Ok((status, body.to_string()))
}
