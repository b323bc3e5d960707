//! Shared helpers for the out-of-process tests: a real cluster started by `scripts/test.sh`
//! (its DSN in `PGQ_TEST_DSN`, its server log in `PGQ_SERVER_LOG`), the real relay binary
//! (`PGQ_RELAY_BIN`), the mock upstream. The relay's own harness is in `relay` and `tls`.
mod relay;
mod tls;
pub use relay::*;
pub use tls::*;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

/// The maintenance DSN of the throwaway cluster.
pub fn cluster_dsn() -> String {
    std::env::var("PGQ_TEST_DSN").expect("PGQ_TEST_DSN is set by scripts/test.sh")
}

/// The cluster's server log as written so far (bytes: an offset into it is always valid).
pub fn server_log() -> Vec<u8> {
    let path = std::env::var("PGQ_SERVER_LOG").expect("PGQ_SERVER_LOG is set by scripts/test.sh");
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

pub async fn connect(dsn: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {dsn}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A brand-new database with the extension created in it; one per test keeps tests independent.
pub async fn fresh_database(name: &str) -> String {
    fresh_database_at(&cluster_dsn(), name).await
}

/// `fresh_database` on the cluster of `maintenance_dsn` (its `dbname`, if any, is replaced).
pub async fn fresh_database_at(maintenance_dsn: &str, name: &str) -> String {
    let admin = connect(&format!("{maintenance_dsn} dbname=postgres")).await;
    // Two statements: CREATE DATABASE cannot run inside the implicit transaction of a batch.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop old test database");
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create test database");
    let dsn = format!("{maintenance_dsn} dbname={name}");
    connect(&dsn)
        .await
        .batch_execute("CREATE EXTENSION pg_quota")
        .await
        .expect("CREATE EXTENSION pg_quota");
    dsn
}

/// A key as the tests need it: its id for SQL checks, its secret for requests.
pub struct Key {
    pub key_id: i64,
    pub user_id: i64,
    pub secret: String,
}

/// A user with one key and one policy on the user; `policy_values` fills
/// `(metric, period, quota_limit, boundary)`.
pub async fn key_with_policy(db: &Client, user: &str, policy_values: &str) -> Key {
    let user_id: i64 = db.query_one("SELECT quota.create_user($1)", &[&user]).await.unwrap().get(0);
    let secret: String = db
        .query_one("SELECT quota.create_key($1, 'k')", &[&user_id])
        .await
        .unwrap()
        .get(0);
    let key_id: i64 = db
        .query_one("SELECT key_id FROM quota.api_key WHERE user_id = $1", &[&user_id])
        .await
        .unwrap()
        .get(0);
    db.batch_execute(&format!(
        "INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, boundary) \
         VALUES ('user', {user_id}, {policy_values})"
    ))
    .await
    .unwrap();
    Key { key_id, user_id, secret }
}

/// Counters equal the ledger (`quota.drift()` is empty) and none is negative.
pub async fn assert_no_drift(db: &Client) {
    let drift = db.query("SELECT * FROM quota.drift()", &[]).await.unwrap();
    assert!(drift.is_empty(), "counters drifted from the ledger: {drift:?}");
    let negative: i64 = db
        .query_one("SELECT count(*) FROM quota.counter WHERE used < 0 OR reserved < 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(negative, 0);
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process that printed `... listening on http://ADDR`; killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    /// Starts `PGQ_RELAY_BIN args...` and waits for its listening line on stdout.
    pub async fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Server {
        let bin = std::env::var("PGQ_RELAY_BIN").expect("PGQ_RELAY_BIN is set by scripts/test.sh");
        let mut child = Command::new(bin)
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn pg-quota-relay");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(pos) = line.find("listening on ") {
                    return line[pos + "listening on ".len()..].trim().to_string();
                }
            }
            panic!("{args:?} exited before listening");
        })
        .await
        .expect("server did not report its address within 20 s");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server { child, url }
    }

    pub async fn mock_upstream() -> Server {
        Server::spawn(&["mock-upstream", "--listen", "127.0.0.1:0"], &[]).await
    }

    /// The relay, forwarding the mock's `x-mock-*` controls (which its allow list holds back).
    pub async fn relay(database_url: &str, upstream_url: &str, extra: &[&str]) -> Server {
        let mut args = vec!["--forward-header", "x-mock-*"];
        args.extend_from_slice(extra);
        Server::relay_bare(database_url, upstream_url, &args).await
    }

    /// The relay with its own header allow list only, plus `extra` flags.
    pub async fn relay_bare(database_url: &str, upstream_url: &str, extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--upstream-url", upstream_url];
        args.extend_from_slice(extra);
        Server::spawn(&args, &[("DATABASE_URL", database_url)]).await
    }
}

/// Seconds of an `x-ratelimit-reset-*` value, which the relay writes as OpenAI does (`45s`,
/// `6m0s`, `1h30m0s`); panics on any other shape.
pub fn reset_seconds(value: &str) -> u64 {
    let mut total = 0;
    let mut rest = value;
    for (unit, scale) in [('h', 3600), ('m', 60), ('s', 1)] {
        if let Some((n, tail)) = rest.split_once(unit) {
            total += scale * n.parse::<u64>().unwrap_or_else(|_| panic!("not a reset time: {value:?}"));
            rest = tail;
        }
    }
    assert!(rest.is_empty() && value.ends_with('s'), "not a reset time: {value:?}");
    total
}

/// What the mock upstream has received so far, oldest first (`GET /_mock/requests`).
pub async fn mock_requests(mock: &Server) -> Vec<serde_json::Value> {
    reqwest::get(format!("{}/_mock/requests", mock.url))
        .await
        .expect("GET /_mock/requests")
        .json()
        .await
        .expect("mock request list is JSON")
}

/// A throwaway cluster of its own, for tests that must stop the database without taking the
/// shared one away from other tests. Owned by `postgres` (initdb and postgres refuse root),
/// trust auth on 127.0.0.1; stopped and removed when dropped.
pub struct PrivateCluster {
    dir: PathBuf,
    pub port: u16,
}

impl PrivateCluster {
    pub async fn start(name: &str) -> PrivateCluster {
        PrivateCluster::start_with(name, "").await
    }

    /// `start`, with `conf` (postgresql.conf lines) added before the first start.
    pub async fn start_with(name: &str, conf: &str) -> PrivateCluster {
        let cluster = PrivateCluster::new(name).await;
        let mut initdb = as_postgres("initdb");
        initdb
            .arg("-D")
            .arg(cluster.dir.join("data"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]);
        run(initdb, "initdb").await;
        cluster.configure(conf);
        cluster.start_again().await;
        cluster
    }

    /// A streaming standby of `primary` (pg_basebackup of it, with its postgresql.conf, then
    /// `conf` added), started and replaying.
    pub async fn standby_of(primary: &PrivateCluster, name: &str, conf: &str) -> PrivateCluster {
        let cluster = PrivateCluster::new(name).await;
        let mut basebackup = as_postgres("pg_basebackup");
        basebackup
            .arg("-D")
            .arg(cluster.dir.join("data"))
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres"])
            .args(["-X", "stream", "-R", "-c", "fast"]);
        run(basebackup, "pg_basebackup").await;
        cluster.configure(conf);
        cluster.start_again().await;
        cluster
    }

    /// An empty directory of its own and a free port.
    async fn new(name: &str) -> PrivateCluster {
        let dir = PathBuf::from(format!("/var/tmp/pgq-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("socket")).expect("create the cluster directory");
        let mut chown = std::process::Command::new("chown");
        chown.args(["-R", "postgres:postgres"]).arg(&dir);
        run(chown, "chown").await;
        PrivateCluster { dir, port: free_port() }
    }

    /// Appends lines to postgresql.conf.
    fn configure(&self, conf: &str) {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("data/postgresql.conf"))
            .expect("open postgresql.conf");
        std::io::Write::write_all(&mut file, format!("\n{conf}\n").as_bytes()).expect("write postgresql.conf");
    }

    /// Its server log as written so far.
    pub fn server_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("server.log")).unwrap_or_default()).into_owned()
    }

    /// Ends recovery: a standby becomes a primary.
    pub async fn promote(&self) {
        let mut promote = self.pg_ctl();
        promote.args(["-w", "promote"]);
        run(promote, "pg_ctl promote").await;
    }

    /// Stops the server the way a crash does (no shutdown checkpoint).
    pub async fn kill(&self) {
        let mut stop = self.pg_ctl();
        stop.args(["-m", "immediate", "-w", "stop"]);
        run(stop, "pg_ctl stop -m immediate").await;
    }

    /// Maintenance DSN over TCP (what the relay is given, with its own dbname).
    pub fn dsn(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// Maintenance DSN over the Unix socket, which stays open to plain connections after
    /// `require_tls`.
    pub fn socket_dsn(&self) -> String {
        format!("host={} port={} user=postgres dbname=postgres", self.dir.join("socket").display(), self.port)
    }

    /// Restarts the server with TLS on (`cert_pem` and `key_pem` for 127.0.0.1) and TCP
    /// connections without it refused. Over TCP the role cert_login logs in with a client
    /// certificate (pg_hba `cert`) signed by `client_ca_pem`; other roles are trusted.
    pub async fn require_tls(&self, cert_pem: &str, key_pem: &str, client_ca_pem: &str) {
        let data = self.dir.join("data");
        std::fs::write(data.join("server.crt"), cert_pem).unwrap();
        std::fs::write(data.join("server.key"), key_pem).unwrap();
        std::fs::write(data.join("client_ca.crt"), client_ca_pem).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all cert_login 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut conf, b"\nssl = on\nssl_ca_file = 'client_ca.crt'\n").unwrap();
        let mut chown = std::process::Command::new("chown");
        chown.arg("postgres:postgres");
        chown.args(["server.crt", "server.key", "client_ca.crt"].map(|f| data.join(f)));
        run(chown, "chown").await;
        let mut chmod = std::process::Command::new("chmod");
        chmod.arg("600").arg(data.join("server.key"));
        run(chmod, "chmod").await;
        self.stop().await;
        self.start_again().await;
    }

    pub async fn stop(&self) {
        let mut stop = self.pg_ctl();
        stop.args(["-m", "fast", "-w", "stop"]);
        run(stop, "pg_ctl stop").await;
    }

    pub async fn start_again(&self) {
        let opts = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            self.port,
            self.dir.join("socket").display()
        );
        let mut start = self.pg_ctl();
        start
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-o", &opts, "-w", "-t", "60", "start"]);
        run(start, "pg_ctl start").await;
    }

    fn pg_ctl(&self) -> std::process::Command {
        let mut c = as_postgres("pg_ctl");
        c.arg("-D").arg(self.dir.join("data"));
        c
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.dir.join("data/postmaster.pid").exists() {
            let _ = self
                .pg_ctl()
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL 15 server binary, run as the `postgres` OS user (through runuser unless we
/// are that user already).
/// A free TCP port on 127.0.0.1: the first free one of `PGQ_TEST_PORTS` (`FIRST-LAST`) when set
/// (to keep out of ports that other servers on the machine use), else one the system picks.
fn free_port() -> u16 {
    let bind = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).ok();
    if let Ok(range) = std::env::var("PGQ_TEST_PORTS") {
        let (first, last) = range.split_once('-').expect("PGQ_TEST_PORTS is FIRST-LAST");
        let (first, last): (u16, u16) = (first.parse().unwrap(), last.parse().unwrap());
        // a port that two tests started at once could both find free is told apart by pid
        let start = first + (std::process::id() % u32::from(last - first + 1)) as u16;
        return (start..=last)
            .chain(first..start)
            .find(|p| bind(*p).is_some())
            .expect("a free port in PGQ_TEST_PORTS");
    }
    bind(0).unwrap().local_addr().unwrap().port()
}

fn as_postgres(binary: &str) -> std::process::Command {
    let dir = std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    let program = format!("{dir}/{binary}");
    let me = std::process::Command::new("id")
        .arg("-un")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if me == "postgres" {
        std::process::Command::new(program)
    } else {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", &program]);
        c
    }
}

async fn run(cmd: std::process::Command, what: &str) {
    let out = Command::from(cmd)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
