//! The `splitgate` command: parses the command line, sets up logging, and maps results
//! to exit codes (0 ok, 1 refused by the admin API or failed at runtime, 2 bad config or
//! usage). No proxy logic lives here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use http::Method;
use splitgate::client::AdminClient;
use splitgate::config::{self, Settings};

/// mimalloc: less CPU per request than glibc's malloc in `benches/compare.sh` (see the
/// README's performance notes). The cargo features choose another for comparison.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "splitgate",
    version,
    about = "Traffic-splitting reverse proxy: stable/canary by user ID, hot weights, SLO auto-revert",
    after_help = EXAMPLES
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The top-level help's (and the man page's) examples; each subcommand's `--help` has
/// its own.
const EXAMPLES: &str = "Examples:
  splitgate demo                                  # try it: two demo upstreams and the proxy
  splitgate check -c /etc/splitgate/splitgate.toml
  splitgate run -c /etc/splitgate/splitgate.toml
  splitgate status                                # every route; exit 1 when one is tripped
  splitgate weight api 25                         # 25 % of users to the canary
  splitgate rollout api start && splitgate rollout api wait
  splitgate rollback api                          # weight 0 now
  splitgate instance drain api-v1 10.0.0.7:8080 --wait
  splitgate freeze on --reason \"incident 42\"
  splitgate completions bash > /etc/bash_completion.d/splitgate
The admin API is http://127.0.0.1:9901 unless --admin or SPLITGATE_ADMIN says
otherwise; changes send SPLITGATE_ADMIN_TOKEN (or --token) when set.";

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a config file.
    #[command(
        after_help = "Signals: SIGTERM/SIGINT drain and exit; SIGHUP reloads the config; SIGUSR2 starts the binary now at this one's path with --takeover (an upgrade; what the systemd unit uses).\n\nExample:\n  splitgate run -c /etc/splitgate/splitgate.toml\n  splitgate run --takeover -c /etc/splitgate/splitgate.toml   # replace the running binary\n  systemctl kill --kill-who=main --signal=SIGUSR2 splitgate   # the same, under systemd"
    )]
    Run {
        /// The config file (TOML; `config/splitgate.toml` is an annotated example).
        #[arg(short, long)]
        config: PathBuf,
        /// Take over from the splitgate running on the same state.dir: receive its
        /// listening sockets, then it drains and exits (a binary upgrade without a
        /// failed request).
        #[arg(long)]
        takeover: bool,
    },
    /// Validate a config file: prints `ok` or every error, exits 2 on error.
    #[command(
        after_help = "Example:\n  splitgate check -c config/splitgate.toml && systemctl reload splitgate"
    )]
    Check {
        /// The config file to check.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Start two demo upstreams and the proxy in front of them.
    #[command(after_help = "Example:\n  splitgate demo --port 18080 --admin-port 19901")]
    Demo {
        /// Proxy port on 127.0.0.1.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Admin port on 127.0.0.1.
        #[arg(long, default_value_t = 9901)]
        admin_port: u16,
    },
    /// Set a route's canary weight (percent, up to two decimals).
    #[command(
        after_help = "Example:\n  splitgate weight api 25\n  splitgate weight api 12.5 --admin http://10.0.0.5:9901 --token \"$TOKEN\""
    )]
    Weight {
        /// The route's name (`[[routes]] name`).
        route: String,
        /// The new weight, 0 to 100, up to two decimals.
        percent: String,
        /// Also when a rollout runs: it is aborted (audited as such). Without it, a
        /// weight other than 0 during a rollout is refused (409).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show every route, or one.
    #[command(
        after_help = "Example:\n  splitgate status            # exit 1 when a route is tripped\n  splitgate status api --json"
    )]
    Status {
        /// Only this route.
        route: Option<String>,
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Set a route's canary weight to 0 now.
    #[command(after_help = "Example:\n  splitgate rollback api")]
    Rollback {
        /// The route's name.
        route: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Clear an SLO trip so the weight may rise again.
    #[command(after_help = "Example:\n  splitgate reset api && splitgate weight api 5")]
    Reset {
        /// The route's name.
        route: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Exit 0 when the admin API answers /healthz (for container health checks).
    #[command(
        after_help = "Example:\n  splitgate health --admin http://127.0.0.1:9901 || echo down"
    )]
    Health {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Drive a route's progressive rollout (`[routes.rollout]`), or wait for it.
    #[command(after_help = ROLLOUT_HELP)]
    Rollout {
        /// The route's name.
        route: String,
        /// What to do (see the list below).
        #[arg(value_enum)]
        action: RolloutCommand,
        /// promote: straight to the last step (still guarded by the judge).
        #[arg(long)]
        full: bool,
        /// start: from the first step at or above the live weight (else a live weight
        /// above step 1 is refused: starting would move users back to stable).
        #[arg(long)]
        from_current: bool,
        /// wait: how long, e.g. 90s, 2h.
        #[arg(long, default_value = "2h", value_parser = parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Put an upstream instance in service or take it out: `ready`, `drain` (no new
    /// requests, those in flight finish) or `maint` (no requests, no health checks).
    /// Exits 0 when done, 1 when refused, 2 when `--wait` timed out.
    #[command(
        after_help = "Example:\n  splitgate instance drain api-v1 10.0.0.7:8080 --wait --timeout 5m\n  splitgate instance ready api-v1 10.0.0.7:8080 --wait"
    )]
    Instance {
        /// The state to put the instance in.
        #[arg(value_enum)]
        state: InstanceAction,
        /// The upstream's name (`[upstreams.NAME]`).
        upstream: String,
        /// The instance's address as `splitgate upstreams` lists it (ip:port).
        addr: String,
        /// drain, maint: return once nothing is in flight to the instance; ready:
        /// once it gets requests (past its health checks).
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits, e.g. 90s, 2m.
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop every rollout from advancing (incident mode), or let them go on. Trips,
    /// rollbacks and aborts still apply. With a fleet, for every replica.
    #[command(
        after_help = "Example:\n  splitgate freeze on --reason \"incident 42\"\n  splitgate freeze off"
    )]
    Freeze {
        /// `on` stops every rollout from advancing; `off` lets them go on.
        #[arg(value_enum)]
        state: FreezeState,
        /// Why (shown in status and the audit log).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Every upstream instance: state, health, requests in flight, connections.
    #[command(
        after_help = "Example:\n  splitgate upstreams\n  splitgate upstreams --json | jq '.upstreams[].instances[] | select(.serving | not)'"
    )]
    Upstreams {
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print a shell completion script, generated from this command line's definition.
    #[command(
        after_help = "Example:\n  splitgate completions bash > /etc/bash_completion.d/splitgate\n  splitgate completions zsh > \"${fpath[1]}/_splitgate\""
    )]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a man page (roff), generated from this command line's definition: splitgate(1), or a subcommand's splitgate-SUBCOMMAND(1).
    #[command(
        after_help = "Example:\n  splitgate man > /usr/local/share/man/man1/splitgate.1 && man splitgate\n  for c in run check weight; do splitgate man $c > /usr/local/share/man/man1/splitgate-$c.1; done"
    )]
    Man {
        /// The subcommand whose page to print (`run` lists the signals); none for splitgate(1).
        subcommand: Option<String>,
    },
    /// The fleet this replica belongs to (`[fleet]`).
    #[command(after_help = "Example:\n  splitgate fleet status --admin http://10.0.0.5:9901")]
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FreezeState {
    /// No rollout advances until `freeze off`.
    On,
    /// Rollouts go on.
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RolloutCommand {
    /// Set step 1's weight and walk the steps, each held while the judge says ok.
    Start,
    /// Stop the clock at the current step.
    Pause,
    /// Start the clock again after a pause.
    Resume,
    /// Weight 0 now; the rollout ends as aborted.
    Abort,
    /// Past a pause step or the current hold to the next step (--full: to the last).
    Promote,
    /// From step 1 again, after an abort, or a trip once reset.
    Retry,
    /// Block until the rollout ends or stops; print each transition.
    Wait,
}

const ROLLOUT_HELP: &str = "\
Exit codes of wait: 0 completed, 1 tripped or aborted, 2 timed out, 3 paused or waiting
at a pause step for promote, 4 nothing to wait for (unknown route, no rollout running).
The admin API not answering for a while (a restart, a takeover) is waited out.

Examples:
  splitgate rollout api start                  # step 1, then each step after its hold
  splitgate rollout api start --from-current   # the live weight is 20%: begin at the first step >= 20%
  splitgate rollout api wait --timeout 2h      # a pipeline blocks here; 3 at a pause step
  splitgate rollout api promote                # past the pause (or the current hold)
  splitgate rollout api promote --full         # straight to the last step, still guarded
  splitgate rollout api pause                  # hold here; resume goes on
  splitgate rollout api resume
  splitgate rollout api abort                  # weight 0 now
  splitgate rollout api retry                  # after an abort, or a trip and its reset";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum InstanceAction {
    /// In service (after passing its health checks, when it has them).
    Ready,
    /// No new requests; those in flight finish.
    Drain,
    /// No requests and no health checks.
    Maint,
}

impl InstanceAction {
    fn as_str(self) -> &'static str {
        match self {
            InstanceAction::Ready => "ready",
            InstanceAction::Drain => "drain",
            InstanceAction::Maint => "maint",
        }
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    config::duration::parse(text)
}

#[derive(Subcommand)]
enum FleetCommand {
    /// The store as this replica sees it, the judging replica, and every member with
    /// the revision it applied. Exits 1 when this replica cannot reach the store.
    Status {
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Admin API base URL.
    #[arg(long, env = "SPLITGATE_ADMIN", default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// Bearer token for changes.
    #[arg(long, env = "SPLITGATE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// Writes generated text to stdout; a reader that stopped early (`| head`) is no error.
fn print_bytes(bytes: &[u8]) -> ExitCode {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("splitgate: cannot write to stdout: {error}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    init_logging(format);
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "splitgate", &mut script);
            print_bytes(&script)
        }
        Command::Man { subcommand } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            if let Some(name) = subcommand {
                let Some(sub) = command.find_subcommand(&name) else {
                    eprintln!("splitgate: no subcommand {name:?}; `splitgate --help` lists them");
                    return ExitCode::from(2);
                };
                command = sub
                    .clone()
                    .display_name(format!("splitgate-{name}"))
                    .bin_name(format!("splitgate {name}"))
                    .version(env!("CARGO_PKG_VERSION"));
            }
            let mut page = Vec::new();
            match clap_mangen::Man::new(command).render(&mut page) {
                Ok(()) => print_bytes(&page),
                Err(error) => {
                    eprintln!("splitgate: cannot render the man page: {error}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Check { config } => match load_and_preflight(&config, LogFormat::Text) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config, takeover } => {
            let settings = match load_and_preflight(&config, format) {
                Ok(settings) => settings,
                Err(code) => return code,
            };
            report(
                format,
                runtime().and_then(|rt| {
                    Ok(rt.block_on(splitgate::app::run(settings, config, takeover))?)
                }),
            )
        }
        Command::Demo { port, admin_port } => report(
            format,
            runtime().and_then(|rt| rt.block_on(demo(port, admin_port))),
        ),
        Command::Weight {
            route,
            percent,
            force,
            admin,
        } => {
            let body = match percent.trim_end_matches('%').parse::<f64>() {
                Ok(value) => format!("{{\"canary_weight\": {value}, \"force\": {force}}}"),
                Err(_) => {
                    eprintln!("weight {percent:?} is not a number");
                    return ExitCode::from(2);
                }
            };
            change(&admin, &route, Method::PUT, "weight", Some(body))
        }
        Command::Status { route, json, admin } => status(&admin, route.as_deref(), json),
        Command::Fleet {
            command: FleetCommand::Status { json, admin },
        } => fleet_status(&admin, json),
        Command::Health { admin } => health(&admin),
        Command::Instance {
            state,
            upstream,
            addr,
            wait,
            timeout,
            admin,
        } => instance(&admin, state, &upstream, &addr, wait.then_some(timeout)),
        Command::Upstreams { json, admin } => upstreams(&admin, json),
        Command::Freeze {
            state,
            reason,
            admin,
        } => {
            let body = serde_json::json!({
                "frozen": state == FreezeState::On,
                "reason": reason.unwrap_or_else(|| "no reason given".into()),
            });
            let result = with_client(&admin, async |client| {
                let (status, text) = client
                    .call(Method::PUT, "/admin/freeze", Some(body.to_string()))
                    .await?;
                let value = expect_ok(status, &text)?;
                Ok(match &value["frozen"] {
                    serde_json::Value::Null => "rollouts are not frozen\n".to_string(),
                    frozen => format!(
                        "rollouts frozen since {} by {}: {}\n",
                        frozen["at"].as_str().unwrap_or("?"),
                        frozen["by"].as_str().unwrap_or("?"),
                        frozen["reason"].as_str().unwrap_or("?")
                    ),
                })
            });
            print_result(result)
        }
        Command::Rollback { route, admin } => {
            change(&admin, &route, Method::POST, "rollback", None)
        }
        Command::Reset { route, admin } => change(&admin, &route, Method::POST, "reset", None),
        Command::Rollout {
            route,
            action: RolloutCommand::Wait,
            timeout,
            admin,
            ..
        } => rollout_wait(&admin, &route, timeout),
        Command::Rollout {
            route,
            action,
            full,
            from_current,
            admin,
            ..
        } => {
            let (name, body) = match action {
                RolloutCommand::Start => ("start", format!("{{\"from_current\": {from_current}}}")),
                // The step this promote is for: refused if the rollout moved on since.
                RolloutCommand::Promote => {
                    let seen = with_client(&admin, async |client| {
                        let (status, text) = client
                            .call(Method::GET, &format!("/admin/routes/{route}"), None)
                            .await?;
                        Ok(expect_ok(status, &text)?["rollout"]["step"].as_u64())
                    })
                    .ok()
                    .flatten();
                    let step = seen.map_or("null".to_string(), |s| s.to_string());
                    ("promote", format!("{{\"full\": {full}, \"step\": {step}}}"))
                }
                RolloutCommand::Pause => ("pause", String::new()),
                RolloutCommand::Resume => ("resume", String::new()),
                RolloutCommand::Abort => ("abort", String::new()),
                RolloutCommand::Retry => ("retry", String::new()),
                RolloutCommand::Wait => unreachable!("handled above"),
            };
            let body = (!body.is_empty()).then_some(body);
            change(
                &admin,
                &route,
                Method::POST,
                &format!("rollout/{name}"),
                body,
            )
        }
    }
}

/// Loads the config and checks what needs the outside world (the admin token, the
/// certificate files). Prints every problem, each naming the file; `Err` is exit 2.
fn load_and_preflight(path: &Path, format: LogFormat) -> Result<Settings, ExitCode> {
    let settings = config::load(path).map_err(|error| {
        for message in error.messages() {
            fatal(format, &message);
        }
        ExitCode::from(2)
    })?;
    let mut problems = Vec::new();
    let token = splitgate::app::admin_token(&settings);
    if let Err(error) = splitgate::app::check_admin_exposure(&settings, token.as_deref()) {
        problems.push(error.to_string());
    }
    for (i, notify) in settings.notify.iter().enumerate() {
        if let Some(name) = &notify.secret_env {
            if std::env::var(name).map_or(true, |v| v.is_empty()) {
                problems.push(format!(
                    "notify[{i}].secret_env: environment variable {name} is not set (its webhooks would go unsigned)"
                ));
            }
        }
    }
    if let Some(tls) = &settings.server.tls {
        match splitgate::server::tls::load(tls) {
            Ok((_, warnings)) => {
                for warning in warnings {
                    match format {
                        LogFormat::Text => eprintln!("{}: warning: {warning}", path.display()),
                        LogFormat::Json => tracing::warn!(config = %path.display(), "{warning}"),
                    }
                }
            }
            Err(error) => problems.push(error.to_string()),
        }
    }
    if problems.is_empty() {
        return Ok(settings);
    }
    for problem in problems {
        fatal(format, &format!("{}: {problem}", path.display()));
    }
    Err(ExitCode::from(2))
}

/// A problem that stops splitgate: a plain line for people, or a JSON event where the
/// logs are JSON (a log shipper would otherwise drop the one line that matters).
fn fatal(format: LogFormat, message: &str) {
    match format {
        LogFormat::Text => eprintln!("{message}"),
        LogFormat::Json => tracing::error!(error = message, "splitgate cannot run"),
    }
}

/// An error and its causes on one line. Most of our errors already include their
/// cause in their own message; a cause is added only when it says something new.
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // rustls logs a WARN for each odd client hello; that is noise at an edge.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    // Colour only on a terminal: escape codes in a log file or journald are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// The control runtime (admin API, state writer, SLO guard; the deploy CLI): one
/// thread. The proxy's workers run runtimes of their own (see `worker`).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn report(format: LogFormat, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let message = error_chain(&error);
            match format {
                LogFormat::Text => fatal(format, &format!("splitgate: {message}")),
                LogFormat::Json => fatal(format, &message),
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs admin calls on a one-thread runtime.
fn with_client<T>(
    args: &AdminArgs,
    work: impl AsyncFnOnce(AdminClient) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    runtime()?.block_on(async {
        let client = AdminClient::new(&args.admin, args.token.clone())?;
        work(client).await
    })
}

/// Parses an admin reply; a refusal becomes an error carrying the API's reason.
fn expect_ok(status: http::StatusCode, text: &str) -> anyhow::Result<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
    if status.is_success() {
        return Ok(value);
    }
    let mut reason = value["error"].as_str().unwrap_or(text.trim()).to_string();
    if let Some(errors) = value["errors"].as_array() {
        for error in errors {
            reason.push_str(&format!("\n  {}", error.as_str().unwrap_or("?")));
        }
    }
    anyhow::bail!("refused ({status}): {reason}")
}

/// A change through the admin API: prints the weight before and after.
fn change(
    args: &AdminArgs,
    route: &str,
    method: Method,
    action: &str,
    body: Option<String>,
) -> ExitCode {
    let result = with_client(args, async |client| {
        let path = format!("/admin/routes/{route}");
        let (status, text) = client.call(Method::GET, &path, None).await?;
        let before = expect_ok(status, &text).ok();
        let (status, text) = client
            .call(method, &format!("{path}/{action}"), body)
            .await?;
        let after = expect_ok(status, &text)?;
        Ok(splitgate::client::change_summary(before.as_ref(), &after))
    });
    print_result(result)
}

fn status(args: &AdminArgs, route: Option<&str>, json: bool) -> ExitCode {
    let result = with_client(args, async |client| {
        let path = route.map_or("/admin/routes".to_string(), |r| {
            format!("/admin/routes/{r}")
        });
        let (status, text) = client.call(Method::GET, &path, None).await?;
        let value = expect_ok(status, &text)?;
        let routes = match route {
            Some(_) => vec![value.clone()],
            None => value["routes"].as_array().cloned().unwrap_or_default(),
        };
        let tripped: Vec<&str> = routes
            .iter()
            .filter(|r| r["slo"]["state"] == "tripped")
            .filter_map(|r| r["name"].as_str())
            .collect();
        let shown = if json {
            text
        } else {
            let mut shown = String::new();
            if let Some(reason) = value["frozen"]["reason"].as_str() {
                shown.push_str(&format!(
                    "ROLLOUTS FROZEN since {} by {}: {reason} (splitgate freeze off)\n",
                    value["frozen"]["at"].as_str().unwrap_or("?"),
                    value["frozen"]["by"].as_str().unwrap_or("?")
                ));
            }
            shown.push_str(&splitgate::client::status_table(&routes));
            shown
        };
        if tripped.is_empty() {
            return Ok(shown);
        }
        // A deploy script must not carry on past an automatic rollback.
        print!("{shown}");
        anyhow::bail!(
            "SLO tripped on {}: canary weight is 0 until `splitgate reset`",
            tripped.join(", ")
        )
    });
    print_result(result)
}

fn fleet_status(args: &AdminArgs, json: bool) -> ExitCode {
    let result = with_client(args, async |client| {
        let (status, text) = client.call(Method::GET, "/admin/fleet", None).await?;
        let fleet = expect_ok(status, &text)?;
        let shown = if json {
            text
        } else {
            splitgate::client::fleet_table(&fleet)
        };
        if fleet["backend"] == "etcd" && fleet["store_up"] != true {
            print!("{shown}");
            anyhow::bail!(
                "this replica cannot reach the fleet store: it serves the last state it applied"
            )
        }
        Ok(shown)
    });
    print_result(result)
}

/// How `splitgate instance … --wait` ended.
enum Waited {
    NoWait,
    Done,
    /// The instance left the upstream while the wait went on.
    Removed,
    TimedOut(String),
}

/// `splitgate instance STATE UPSTREAM ADDR [--wait]`.
fn instance(
    args: &AdminArgs,
    state: InstanceAction,
    upstream: &str,
    addr: &str,
    wait: Option<std::time::Duration>,
) -> ExitCode {
    let path = format!("/admin/upstreams/{upstream}/instances/{addr}");
    let result = with_client(args, async |client| {
        let body = format!("{{\"state\": \"{}\"}}", state.as_str());
        let (status, text) = client
            .call(Method::PUT, &format!("{path}/state"), Some(body))
            .await?;
        let value = expect_ok(status, &text)?;
        if let Some(warning) = value["warning"].as_str() {
            eprintln!("splitgate: warning: {warning}");
        }
        println!(
            "{upstream} {addr}: {} ({} in flight, health {})",
            value["state"].as_str().unwrap_or("?"),
            value["in_flight"],
            value["health"].as_str().unwrap_or("?")
        );
        let Some(timeout) = wait else {
            return Ok(Waited::NoWait);
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = value;
        // Nothing in flight on two reads in a row, 200 ms apart, before a drain counts
        // as done.
        let mut quiet_reads = 0;
        loop {
            let done = match state {
                InstanceAction::Ready => last["serving"] == true,
                _ => {
                    let quiet =
                        last["in_flight"] == 0 && fleet_settled(&last["fleet"], state.as_str());
                    quiet_reads = if quiet { quiet_reads + 1 } else { 0 };
                    quiet_reads >= 2
                }
            };
            if done {
                return Ok(Waited::Done);
            }
            if last["state"] != state.as_str() {
                anyhow::bail!(
                    "{upstream} {addr} was set to {} meanwhile; stopped waiting",
                    last["state"]
                );
            }
            if tokio::time::Instant::now() >= deadline {
                let what = match state {
                    InstanceAction::Ready => format!(
                        "it is still not serving (health {}{})",
                        last["health"].as_str().unwrap_or("?"),
                        last["last_error"]
                            .as_str()
                            .map(|e| format!(", last check: {e}"))
                            .unwrap_or_default()
                    ),
                    _ => match unsettled_replicas(&last["fleet"], state.as_str()) {
                        waiting if waiting.is_empty() => {
                            format!("{} requests still in flight", last["in_flight"])
                        }
                        waiting => format!(
                            "{} requests still in flight here; not yet done on {}",
                            last["in_flight"],
                            waiting.join(", ")
                        ),
                    },
                };
                return Ok(Waited::TimedOut(format!(
                    "timed out after {}s waiting for {upstream} {addr}: {what}",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let (status, text) = client.call(Method::GET, &path, None).await?;
            if status == http::StatusCode::NOT_FOUND && state != InstanceAction::Ready {
                // Gone from the upstream meanwhile (DNS or a reload): it gets no new
                // request, and splitgate no longer counts the ones it had.
                return Ok(Waited::Removed);
            }
            let now = expect_ok(status, &text)?;
            if now["in_flight"] != last["in_flight"] && state != InstanceAction::Ready {
                println!("{upstream} {addr}: {} in flight", now["in_flight"]);
            }
            last = now;
        }
    });
    match result {
        Ok(Waited::NoWait) => ExitCode::SUCCESS,
        Ok(Waited::Done) => {
            let done = match state {
                InstanceAction::Ready => "serving",
                _ => "nothing in flight",
            };
            println!("{upstream} {addr}: {done}");
            ExitCode::SUCCESS
        }
        Ok(Waited::Removed) => {
            eprintln!("splitgate: {upstream} {addr} was removed from the upstream (DNS or a reload) while waiting: it gets no new request, but its requests in flight are no longer counted");
            ExitCode::FAILURE
        }
        Ok(Waited::TimedOut(timed_out)) => {
            eprintln!("splitgate: {timed_out}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("splitgate: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// With a fleet (`fleet` is the instance view's `fleet` object): whether every replica
/// reports the instance in `state` with nothing in flight. Without one, true.
fn fleet_settled(fleet: &serde_json::Value, state: &str) -> bool {
    fleet.is_null()
        || (fleet["replicas"].as_array().is_some_and(|r| !r.is_empty())
            && unsettled_replicas(fleet, state).is_empty())
}

/// The replicas that do not yet report the instance in `state` with nothing in flight.
fn unsettled_replicas(fleet: &serde_json::Value, state: &str) -> Vec<String> {
    fleet["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["state"] != state || r["in_flight"] != 0)
        .map(|r| {
            format!(
                "{} ({}, {} in flight)",
                r["replica"].as_str().unwrap_or("?"),
                r["state"].as_str().unwrap_or("?"),
                r["in_flight"]
            )
        })
        .collect()
}

/// `splitgate rollout ROUTE wait`: polls the route every 500 ms, prints each transition,
/// and exits 0 completed, 1 tripped or aborted, 2 timed out, 3 paused or at a gate.
fn rollout_wait(args: &AdminArgs, route: &str, timeout: std::time::Duration) -> ExitCode {
    let result = with_client(args, async |client| {
        let path = format!("/admin/routes/{route}");
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::new();
        let mut unreachable = false;
        loop {
            // The admin API away for a moment (a restart, a takeover) is waited out, up
            // to the deadline; an answer that says the wait makes no sense is not.
            let call = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                client.call(Method::GET, &path, None),
            )
            .await;
            let answer = match call {
                Ok(Ok((status, text))) if !status.is_server_error() => Some((status, text)),
                Ok(Ok(_)) | Ok(Err(_)) | Err(_) => None,
            };
            let Some((status, text)) = answer else {
                if !unreachable {
                    eprintln!("splitgate: the admin API does not answer; trying again");
                    unreachable = true;
                }
                if tokio::time::Instant::now() >= deadline {
                    eprintln!(
                        "splitgate: timed out after {}s (the admin API did not answer)",
                        timeout.as_secs()
                    );
                    return Ok(2);
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            };
            unreachable = false;
            let value = expect_ok(status, &text)?;
            let rollout = &value["rollout"];
            if rollout.is_null() {
                anyhow::bail!("route {route:?} has no [routes.rollout] in the config");
            }
            let state = rollout["state"].as_str().unwrap_or("?").to_string();
            let line = splitgate::client::rollout_line(&value);
            // A transition: another state, step or weight (not the hold's countdown).
            let waiting_on = rollout["waiting_for"]
                .as_str()
                .map(|w| w.split(':').next().unwrap_or(w).to_string());
            let key = format!(
                "{state} {} {} {waiting_on:?}",
                rollout["step"], value["canary_weight"]
            );
            if key != last {
                println!("{line}");
                last = key;
            }
            match state.as_str() {
                "completed" => return Ok(0),
                "tripped" | "aborted" => return Ok(1),
                "paused" => return Ok(3),
                "waiting" if rollout["waiting_for"] == "promote" => return Ok(3),
                "idle" => anyhow::bail!("route {route:?} has no rollout running (start it first)"),
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                eprintln!(
                    "splitgate: timed out after {}s; the rollout goes on ({line})",
                    timeout.as_secs()
                );
                return Ok(2);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        // Not an outcome of the rollout: an unknown route, no rollout to wait for.
        Err(error) => {
            eprintln!("splitgate: {}", error_chain(&error));
            ExitCode::from(4)
        }
    }
}

fn upstreams(args: &AdminArgs, json: bool) -> ExitCode {
    let result = with_client(args, async |client| {
        let (status, text) = client.call(Method::GET, "/admin/upstreams", None).await?;
        let value = expect_ok(status, &text)?;
        Ok(if json {
            text
        } else {
            let upstreams = value["upstreams"].as_array().cloned().unwrap_or_default();
            splitgate::client::upstreams_table(&upstreams)
        })
    });
    print_result(result)
}

fn print_result(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("splitgate: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// `splitgate health`: exit 0 when `/healthz` answers 200.
fn health(args: &AdminArgs) -> ExitCode {
    let result = with_client(args, async |client| {
        let (status, text) = client.call(Method::GET, "/healthz", None).await?;
        expect_ok(status, &text).map(|_| text)
    });
    print_result(result)
}

async fn demo(port: u16, admin_port: u16) -> anyhow::Result<()> {
    let stable = splitgate::demo::start_upstream("stable").await?;
    let canary = splitgate::demo::start_upstream("canary").await?;
    let state_dir = std::env::temp_dir().join(format!("splitgate-demo-{}", std::process::id()));
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let text = splitgate::demo::config_text(listen, admin, &state_dir, stable.addr, canary.addr);
    let config_path = state_dir.join("demo.toml");
    std::fs::create_dir_all(&state_dir)?;
    std::fs::write(&config_path, &text)?;
    let settings: Settings = config::parse(Path::new("demo.toml"), &text).context("demo config")?;
    let running = splitgate::app::start(settings, Some(config_path.clone())).await?;
    println!(
        r#"
splitgate demo is running (Ctrl-C to stop). Route "demo": 10 % canary by X-User-Id.

  Proxy:   http://{proxy}
  Admin:   http://{admin}   (/admin/routes, /metrics, /healthz, /readyz)
  Config:  {config}

Try:
  for u in alice bob carol dave erin frank grace heidi; do curl -s -H "X-User-Id: $u" http://{proxy}/; done
  cargo run --release -- status demo --admin http://{admin}
  cargo run --release -- weight demo 50 --admin http://{admin}
  cargo run --release -- rollout demo start --from-current --admin http://{admin}
  cargo run --release -- rollout demo wait --admin http://{admin}

Break the canary and watch the SLO guard set its weight to 0:
  curl -X POST http://{canary}/fail
  for i in $(seq 200); do curl -s -o /dev/null -H "X-User-Id: user$i" http://{proxy}/; done
  cargo run --release -- status demo --admin http://{admin}
  curl -s http://{admin}/metrics | grep -E 'splitgate_(canary_weight|slo_state|slo_trips_total)'
Heal it, then reset the trip:
  curl -X POST http://{canary}/heal
  cargo run --release -- reset demo --admin http://{admin}

gRPC: route "demo-grpc" sends /splitgate.demo.* to the same servers over h2c. A call
with curl (the reply's grpc-status comes in the trailers, printed last):
  printf '\0\0\0\0\5hello' | curl -s --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' -H 'X-User-Id: alice' --data-binary @- http://{proxy}/splitgate.demo.Greeter/Hello -D - -o - | cat -v
While the canary fails, its calls are HTTP 200 with grpc-status 14 in the trailers;
the judge reads them and trips "demo-grpc" too:
  for i in $(seq 200); do printf '\0\0\0\0\5hello' | curl -s -o /dev/null --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' -H "X-User-Id: user$i" --data-binary @- http://{proxy}/splitgate.demo.Greeter/Hello; done
  cargo run --release -- status demo-grpc --admin http://{admin}
"#,
        proxy = running.proxy_addr,
        admin = running.admin_addr,
        canary = canary.addr,
        config = config_path.display(),
    );
    tokio::signal::ctrl_c().await?;
    running.shutdown().await;
    // The demo's state is its own, named after this process, and never reused.
    match std::fs::remove_dir_all(&state_dir) {
        Ok(()) => println!("splitgate demo stopped; removed {}", state_dir.display()),
        Err(error) => println!(
            "splitgate demo stopped; {} stays: {error}",
            state_dir.display()
        ),
    }
    Ok(())
}
