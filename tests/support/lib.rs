//! Shared helpers for the out-of-process tests: a real cluster started by `scripts/test.sh`
//! (its DSN in `PGQ_TEST_DSN`), the real relay binary (`PGQ_RELAY_BIN`), the mock upstream.
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

/// The maintenance DSN of the throwaway cluster.
pub fn cluster_dsn() -> String {
    std::env::var("PGQ_TEST_DSN").expect("PGQ_TEST_DSN is set by scripts/test.sh")
}

pub fn dsn_for(dbname: &str) -> String {
    format!("{} dbname={dbname}", cluster_dsn())
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
    let admin = connect(&cluster_dsn()).await;
    // Two statements: CREATE DATABASE cannot run inside the implicit transaction of a batch.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop old test database");
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create test database");
    let dsn = dsn_for(name);
    connect(&dsn)
        .await
        .batch_execute("CREATE EXTENSION pg_quota")
        .await
        .expect("CREATE EXTENSION pg_quota");
    dsn
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

    pub async fn relay(database_url: &str, upstream_url: &str, extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--upstream-url", upstream_url];
        args.extend_from_slice(extra);
        Server::spawn(&args, &[("DATABASE_URL", database_url)]).await
    }
}
