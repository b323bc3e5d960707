//! Command line: flags with environment fallbacks. Secrets come only from a flag or the
//! environment and are never printed (`hide_env_values`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "pg-quota-relay",
    version,
    about = "OpenAI-compatible relay in front of pg_quota"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay OpenAI-compatible requests, calling quota.admit / quota.settle around each one.
    Serve(ServeArgs),
    /// A fake OpenAI-compatible upstream for demos and tests.
    MockUpstream(MockArgs),
    /// Follow quota.event and POST the events of chosen kinds to webhooks (Slack too), signed,
    /// retried, at least once.
    Notify(NotifyArgs),
}

/// The payload a webhook receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WebhookFormat {
    /// the event as JSON: event_id, kind, at, policy_id, key_id, user_id, detail
    Json,
    /// `{"text": "..."}`, which a Slack incoming webhook (and its look-alikes) posts as is
    Slack,
}

#[derive(Args)]
pub struct NotifyArgs {
    /// The database (connect as a login role granted quota_admin).
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// The notifier's name: its cursor (quota.notifier_cursor) and its deliveries
    /// (quota.webhook_delivery). Two notifiers of one name never run at once.
    #[arg(long, env = "PGQ_NOTIFY_NAME", default_value = "default")]
    pub name: String,

    /// A webhook URL to POST each event to. Repeat the flag, or list them comma-separated in
    /// the environment variable (a Slack URL is a secret: prefer the environment).
    #[arg(
        long = "webhook-url",
        env = "PGQ_WEBHOOK_URLS",
        value_delimiter = ',',
        required = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    pub webhook_urls: Vec<String>,

    /// Key of the HMAC-SHA256 signature sent with each delivery (header x-pgquota-signature).
    /// Without it deliveries are not signed.
    #[arg(long, env = "PGQ_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// The event kinds to deliver (comma-separated), or `all`.
    #[arg(
        long,
        env = "PGQ_NOTIFY_KINDS",
        value_delimiter = ',',
        default_value = "threshold_crossed,exhausted,disabled,shadow_refusal"
    )]
    pub kinds: Vec<String>,

    /// The payload: the event as JSON, or a Slack-compatible `text`.
    #[arg(long, env = "PGQ_WEBHOOK_FORMAT", value_enum, default_value_t = WebhookFormat::Json)]
    pub format: WebhookFormat,

    /// On the very first start (no cursor yet), deliver the events already in the log; by
    /// default a new notifier starts after the latest one.
    #[arg(long)]
    pub from_start: bool,

    /// Seconds between two reads of the event log when no NOTIFY wakes the notifier.
    #[arg(long, env = "PGQ_NOTIFY_POLL_S", default_value_t = 5.0)]
    pub poll_s: f64,

    /// Seconds before the first retry of a failed delivery; each retry waits twice as long.
    #[arg(long, env = "PGQ_WEBHOOK_RETRY_S", default_value_t = 2.0)]
    pub retry_s: f64,

    /// Longest wait between two retries, in seconds.
    #[arg(long, env = "PGQ_WEBHOOK_RETRY_MAX_S", default_value_t = 600.0)]
    pub retry_max_s: f64,

    /// Attempts of one delivery before it is marked failed and retried no more.
    #[arg(long, env = "PGQ_WEBHOOK_MAX_ATTEMPTS", default_value_t = 12)]
    pub max_attempts: i32,

    /// Seconds one POST may take.
    #[arg(long, env = "PGQ_WEBHOOK_TIMEOUT_S", default_value_t = 10.0)]
    pub timeout_s: f64,
}

// Hand-written so that the database URL, the webhook URLs and the secret never reach a log.
impl std::fmt::Debug for NotifyArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyArgs")
            .field("name", &self.name)
            .field("webhook_urls", &self.webhook_urls.len())
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("kinds", &self.kinds)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Where the database is and how TLS to it is checked (`serve` and `notify`).
#[derive(Args)]
pub struct DatabaseArgs {
    /// libpq-style URL or key=value string of the pg_quota database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// PEM file of the CAs that sign the database server's certificate: TLS connections to
    /// the database then verify it and the host name (libpq's verify-full). Without it, TLS
    /// (per the URL's sslmode) encrypts without checking the certificate, as libpq does.
    #[arg(long, env = "PGQ_DATABASE_CA_FILE")]
    pub database_ca_file: Option<std::path::PathBuf>,

    /// PEM file of the client certificate (and its chain) that the relay presents to the
    /// database over TLS, for `cert` authentication in pg_hba.conf (libpq's sslcert). Needs
    /// --database-key-file and a TLS connection.
    #[arg(long, env = "PGQ_DATABASE_CERT_FILE", requires = "database_key_file")]
    pub database_cert_file: Option<std::path::PathBuf>,

    /// PEM file of the private key of --database-cert-file (libpq's sslkey).
    #[arg(long, env = "PGQ_DATABASE_KEY_FILE", requires = "database_cert_file")]
    pub database_key_file: Option<std::path::PathBuf>,
}

impl DatabaseArgs {
    pub fn tls_files(&self) -> crate::db_tls::TlsFiles<'_> {
        crate::db_tls::TlsFiles {
            ca: self.database_ca_file.as_deref(),
            client: self
                .database_cert_file
                .as_deref()
                .zip(self.database_key_file.as_deref()),
        }
    }
}

// Hand-written so that the database URL (it may hold a password) never reaches a log.
impl std::fmt::Debug for DatabaseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseArgs")
            .field("database_ca_file", &self.database_ca_file)
            .field("database_cert_file", &self.database_cert_file)
            .field("database_key_file", &self.database_key_file)
            .finish_non_exhaustive()
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "PGQ_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Maximum number of database connections.
    #[arg(long, env = "PGQ_POOL_SIZE", default_value_t = 16)]
    pub pool_size: usize,

    /// OpenAI-compatible base URL (e.g. http://127.0.0.1:9090/v1), used when admit names no
    /// channel upstream.
    #[arg(long, env = "PGQ_UPSTREAM_URL")]
    pub upstream_url: Option<String>,

    /// Bearer key sent to --upstream-url (never to a channel's own upstream URL).
    #[arg(long, env = "PGQ_UPSTREAM_API_KEY", hide_env_values = true)]
    pub upstream_api_key: Option<String>,

    /// PEM file of extra CA certificates to trust for https upstreams (an internal CA), on top
    /// of the system's trust store and the built-in public roots.
    #[arg(long, env = "PGQ_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<std::path::PathBuf>,

    /// Largest request body accepted; larger bodies get 413.
    #[arg(long, env = "PGQ_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Output tokens reserved when the request names no max_tokens-style limit.
    #[arg(long, env = "PGQ_DEFAULT_MAX_OUTPUT_TOKENS", default_value_t = 1024)]
    pub default_max_output_tokens: i64,

    /// When the database cannot be connected to, forward requests of keys admitted within
    /// --fail-open-recent-s WITHOUT accounting (each logged at WARN and counted), within a
    /// budget per outage, instead of answering 503.
    #[arg(long, env = "PGQ_FAIL_OPEN", action = ArgAction::SetTrue,
          value_parser = BoolishValueParser::new())]
    pub fail_open: bool,

    /// With --fail-open: how recently a key must have been admitted to pass during an outage.
    #[arg(long, env = "PGQ_FAIL_OPEN_RECENT_S", default_value_t = 900)]
    pub fail_open_recent_s: u64,

    /// With --fail-open: requests forwarded without accounting per outage, after which the
    /// relay fails closed until the database is back.
    #[arg(long, env = "PGQ_FAIL_OPEN_MAX_REQUESTS", default_value_t = 1000)]
    pub fail_open_max_requests: u64,

    /// With --fail-open: seconds from the start of an outage after which the relay fails closed
    /// until the database is back.
    #[arg(long, env = "PGQ_FAIL_OPEN_MAX_S", default_value_t = 300)]
    pub fail_open_max_s: u64,

    /// A client header the upstream may also see, on top of the built-in allow list: a name
    /// (`x-trace-id`) or a prefix ending in `*` (`x-mock-*`). Repeat the flag, or list them
    /// comma-separated in the environment variable.
    #[arg(
        long = "forward-header",
        env = "PGQ_FORWARD_HEADERS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub forward_headers: Vec<String>,

    /// Directory for the relay's own state: the journal of settlements still pending at
    /// shutdown, replayed at the next start. Without it they are left to quota.sweep().
    #[arg(long, env = "PGQ_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,

    /// Total time allowed for one upstream request, streaming included (seconds, may be
    /// fractional).
    #[arg(long, env = "PGQ_UPSTREAM_TIMEOUT_S", default_value_t = 600.0)]
    pub upstream_timeout_s: f64,

    /// How long a settlement (or refund) is retried while the database is unreachable, from
    /// its first attempt. Keep it above your database's failover time: a settlement given up
    /// is a request never charged.
    #[arg(long, env = "PGQ_SETTLE_RETRY_S", default_value_t = 600)]
    pub settle_retry_s: u64,

    /// At most this many concurrent admits (and, apart, settlements) go to the database as one
    /// batch, one transaction (quota.admit_many / quota.settle_many). No timer: whatever is
    /// queued when a connection is free goes; a lone request waits for nothing. 1 turns it off.
    #[arg(long, env = "PGQ_BATCH_MAX", default_value_t = crate::proxy::batcher::DEFAULT_BATCH_MAX_FLAG,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch_max: u16,

    /// How long shutdown waits for in-flight settlements after the listener has closed.
    #[arg(long, env = "PGQ_SHUTDOWN_GRACE_S", default_value_t = 30)]
    pub shutdown_grace_s: u64,
}

// Hand-written so that the database URL (it may hold a password) and keys never reach a log.
impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeArgs")
            .field("database", &self.database)
            .field("listen", &self.listen)
            .field("pool_size", &self.pool_size)
            .field("upstream_url", &self.upstream_url)
            .field(
                "upstream_api_key",
                &self.upstream_api_key.as_ref().map(|_| "<redacted>"),
            )
            .field("upstream_ca_file", &self.upstream_ca_file)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("default_max_output_tokens", &self.default_max_output_tokens)
            .field("fail_open", &self.fail_open)
            .field("fail_open_recent_s", &self.fail_open_recent_s)
            .field("fail_open_max_requests", &self.fail_open_max_requests)
            .field("fail_open_max_s", &self.fail_open_max_s)
            .field("forward_headers", &self.forward_headers)
            .field("state_dir", &self.state_dir)
            .field("upstream_timeout_s", &self.upstream_timeout_s)
            .field("settle_retry_s", &self.settle_retry_s)
            .field("batch_max", &self.batch_max)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Args)]
pub struct MockArgs {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "PGQ_MOCK_LISTEN", default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,

    /// Delay before the response headers (header x-mock-latency-ms overrides).
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,

    /// Completion tokens produced per request (header x-mock-output-tokens overrides).
    #[arg(long, default_value_t = 16)]
    pub output_tokens: u64,

    /// Delay between two SSE chunks (header x-mock-chunk-delay-ms overrides).
    #[arg(long, default_value_t = 10)]
    pub chunk_delay_ms: u64,

    /// Cached prompt tokens reported in usage (header x-mock-cached-tokens overrides).
    #[arg(long, default_value_t = 0)]
    pub cached_tokens: u64,

    /// Failure to simulate on every request: an HTTP status (500, 429, 400...), `timeout` or
    /// `disconnect-mid-stream` (header x-mock-fail overrides).
    #[arg(long)]
    pub fail: Option<String>,
}

/// A client header name the operator lets through: exact, or a prefix (`x-mock-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderPattern {
    Exact(String),
    Prefix(String),
}

/// Headers no flag can forward: credentials, the relay's own, and what HTTP itself manages.
const NEVER_FORWARDED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "x-request-id",
];

impl HeaderPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let name = text.trim().to_ascii_lowercase();
        let (stem, prefix) = match name.strip_suffix('*') {
            Some(stem) => (stem.to_string(), true),
            None => (name.clone(), false),
        };
        let valid = !stem.is_empty()
            && stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid || (prefix && stem.len() < 3) {
            return Err(format!(
                "--forward-header {text:?}: expected a header name or a prefix of at least 3 characters ending in '*'"
            ));
        }
        let refused = NEVER_FORWARDED.iter().any(|n| {
            if prefix {
                n.starts_with(&stem)
            } else {
                *n == stem
            }
        }) || stem.starts_with("x-pgq-")
            || "x-pgq-".starts_with(&stem);
        if refused {
            return Err(format!(
                "--forward-header {text:?}: credentials, hop-by-hop headers and the relay's own headers are never forwarded"
            ));
        }
        Ok(if prefix {
            HeaderPattern::Prefix(stem)
        } else {
            HeaderPattern::Exact(stem)
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            HeaderPattern::Exact(n) => name == n,
            HeaderPattern::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

/// `--fail-open` and its bounds.
#[derive(Debug, Clone)]
pub struct FailOpenConfig {
    pub enabled: bool,
    /// keys admitted this recently pass during an outage
    pub recent: Duration,
    /// requests forwarded without accounting per outage
    pub max_requests: u64,
    /// how long an outage may be served open
    pub max_outage: Duration,
}

/// What the relay's request path needs from the command line.
#[derive(Clone)]
pub struct RelayConfig {
    pub upstream_url: Option<String>,
    pub upstream_api_key: Option<String>,
    /// extra CA certificates trusted for https upstreams
    pub upstream_ca: Vec<reqwest::Certificate>,
    pub max_body_bytes: usize,
    pub default_max_output_tokens: i64,
    pub fail_open: FailOpenConfig,
    /// client headers forwarded on top of the built-in allow list (--forward-header)
    pub forward_headers: Vec<HeaderPattern>,
    pub upstream_timeout: Duration,
    /// how long a settlement is retried (see --settle-retry-s)
    pub settle_retry: Duration,
    /// most calls in one batch (see --batch-max; 1: no batching)
    pub batch_max: usize,
}

impl RelayConfig {
    pub fn from_args(args: &ServeArgs) -> Result<Self, String> {
        if !(args.upstream_timeout_s.is_finite() && args.upstream_timeout_s > 0.0) {
            return Err("--upstream-timeout-s must be a positive number of seconds".into());
        }
        if args.default_max_output_tokens < 0 {
            return Err("--default-max-output-tokens must not be negative".into());
        }
        if let Some(url) = &args.upstream_url {
            reqwest::Url::parse(url)
                .map_err(|e| format!("--upstream-url {url:?} is not a valid URL: {e}"))?;
        }
        let forward_headers = args
            .forward_headers
            .iter()
            .filter(|h| !h.trim().is_empty())
            .map(|h| HeaderPattern::parse(h))
            .collect::<Result<Vec<_>, _>>()?;
        let upstream_ca = match &args.upstream_ca_file {
            None => vec![],
            Some(path) => read_pem_certificates("--upstream-ca-file", path)?
                .iter()
                .map(|der| reqwest::Certificate::from_der(der))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("--upstream-ca-file {}: {e}", path.display()))?,
        };
        Ok(Self {
            upstream_url: args.upstream_url.clone(),
            upstream_api_key: args.upstream_api_key.clone().filter(|k| !k.is_empty()),
            upstream_ca,
            max_body_bytes: args.max_body_bytes,
            default_max_output_tokens: args.default_max_output_tokens,
            fail_open: FailOpenConfig {
                enabled: args.fail_open,
                recent: Duration::from_secs(args.fail_open_recent_s),
                max_requests: args.fail_open_max_requests,
                max_outage: Duration::from_secs(args.fail_open_max_s),
            },
            forward_headers,
            upstream_timeout: Duration::from_secs_f64(args.upstream_timeout_s),
            settle_retry: Duration::from_secs(args.settle_retry_s),
            batch_max: usize::from(args.batch_max),
        })
    }
}

/// The certificates of a PEM file named by `flag`; an unreadable file, or one without a
/// certificate, is an error naming the flag and the file.
pub fn read_pem_certificates(
    flag: &str,
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let (pem, shown) = (read_named_file(flag, path)?, path.display());
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {shown}: not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{flag} {shown}: holds no PEM certificate"));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file (PKCS#8, PKCS#1 or SEC1), for the flag named `flag`.
pub fn read_pem_private_key(
    flag: &str,
    path: &std::path::Path,
) -> Result<rustls::pki_types::PrivateKeyDer<'static>, String> {
    use rustls::pki_types::pem::PemObject;
    let (pem, shown) = (read_named_file(flag, path)?, path.display());
    rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{flag} {shown}: holds no PEM private key: {e}"))
}

/// The bytes of the file that the flag named `flag` names; failing, an error naming both.
fn read_named_file(flag: &str, path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: cannot read it: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["pg-quota-relay", "serve", "--database-url", "host=db"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn notify_needs_a_webhook_and_takes_kinds_and_urls_as_lists() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["pg-quota-relay", "notify", "--database-url", "host=db"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Notify(a) => a,
                _ => unreachable!(),
            })
        };
        assert!(parse(&[]).is_err(), "--webhook-url is required");
        let a = parse(&[
            "--webhook-url",
            "http://a/1",
            "--webhook-url",
            "http://b/2",
            "--kinds",
            "exhausted,reset",
        ])
        .unwrap();
        assert_eq!(a.webhook_urls, ["http://a/1", "http://b/2"]);
        assert_eq!(a.kinds, ["exhausted", "reset"]);
        assert_eq!(a.format, WebhookFormat::Json);
        assert_eq!(a.name, "default");
        let a = parse(&[
            "--webhook-url",
            "http://a/1",
            "--format",
            "slack",
            "--webhook-secret",
            "s",
        ])
        .unwrap();
        assert_eq!(a.format, WebhookFormat::Slack);
        assert!(a.kinds.contains(&"threshold_crossed".to_string()));
        // the secret and the URLs stay out of Debug output
        let shown = format!("{a:?}");
        assert!(
            !shown.contains("http://a/1") && !shown.contains("\"s\""),
            "{shown}"
        );
    }

    #[test]
    fn serve_defaults_and_flags() {
        let a = serve(&[]);
        assert_eq!(a.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(a.pool_size, 16);
        assert_eq!(a.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(a.default_max_output_tokens, 1024);
        assert!(!a.fail_open);
        let c = RelayConfig::from_args(&a).unwrap();
        assert_eq!(c.upstream_timeout, Duration::from_secs(600));
        assert_eq!(c.settle_retry, Duration::from_secs(600));
        let a = serve(&[
            "--fail-open",
            "--upstream-timeout-s",
            "0.5",
            "--listen",
            "127.0.0.1:0",
        ]);
        assert!(a.fail_open);
        let c = RelayConfig::from_args(&a).unwrap();
        assert!(c.fail_open.enabled);
        assert_eq!(c.fail_open.recent, Duration::from_secs(900));
        assert_eq!(c.fail_open.max_requests, 1000);
        assert_eq!(c.fail_open.max_outage, Duration::from_secs(300));
        assert_eq!(
            RelayConfig::from_args(&a).unwrap().upstream_timeout,
            Duration::from_millis(500)
        );
        assert!(RelayConfig::from_args(&serve(&["--upstream-url", "not a url"])).is_err());
    }

    #[test]
    fn forwarded_header_patterns_are_names_or_prefixes_never_credentials() {
        let c = RelayConfig::from_args(&serve(&[
            "--forward-header",
            "X-Mock-*",
            "--forward-header",
            "x-trace-id",
        ]))
        .unwrap();
        assert_eq!(
            c.forward_headers,
            [
                HeaderPattern::Prefix("x-mock-".into()),
                HeaderPattern::Exact("x-trace-id".into())
            ]
        );
        assert!(c.forward_headers[0].matches("x-mock-fail"));
        assert!(!c.forward_headers[1].matches("x-trace-idx"));
        for bad in [
            "authorization",
            "x-pgq-*",
            "*",
            "x*",
            "cookie",
            "a b",
            "x-request-id",
            "co*",
        ] {
            let err = RelayConfig::from_args(&serve(&["--forward-header", bad]))
                .err()
                .unwrap_or_else(|| panic!("{bad} was accepted"));
            assert!(err.starts_with("--forward-header"), "{err}");
        }
    }

    #[test]
    fn an_unusable_ca_file_is_refused_naming_the_flag() {
        let dir = std::env::temp_dir().join(format!("pgq-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "just some text\n").unwrap();
        for path in [&missing, &not_pem] {
            let err =
                RelayConfig::from_args(&serve(&["--upstream-ca-file", path.to_str().unwrap()]))
                    .err()
                    .unwrap_or_else(|| panic!("{} was accepted", path.display()));
            assert!(
                err.starts_with("--upstream-ca-file ") && err.contains(path.to_str().unwrap()),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_client_certificate_comes_with_its_key() {
        let argv = |extra: &[&'static str]| {
            let mut argv = vec!["pg-quota-relay", "serve", "--database-url", "host=db"];
            argv.extend_from_slice(extra);
            argv
        };
        for alone in ["--database-cert-file", "--database-key-file"] {
            let err = Cli::try_parse_from(argv(&[alone, "x.pem"])).err().unwrap();
            assert!(err.to_string().contains("required"), "{alone}: {err}");
        }
        let a = serve(&[
            "--database-cert-file",
            "c.pem",
            "--database-key-file",
            "k.pem",
        ]);
        assert_eq!(
            a.database.database_cert_file.as_deref(),
            Some(std::path::Path::new("c.pem"))
        );
        assert_eq!(
            a.database.database_key_file.as_deref(),
            Some(std::path::Path::new("k.pem"))
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let a = serve(&["--upstream-api-key", "sk-very-secret"]);
        let shown = format!("{a:?}");
        assert!(
            !shown.contains("sk-very-secret") && !shown.contains("host=db"),
            "{shown}"
        );
    }
}
