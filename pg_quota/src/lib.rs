//! pg_quota: API-key quotas for LLM gateways, enforced inside PostgreSQL.
//!
//! Window math lives in the pgrx-free `pg_quota_core` crate; the hot path of the request
//! lifecycle (`quota.admit`, `quota.settle`) in `lifecycle/`, native code over SPI; the tables,
//! the other lifecycle and admin functions in the hand-written SQL under `sql/schema/`.
use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

mod clock;
mod gucs;
mod lifecycle;
mod pricing;
mod sweeper;
mod window;

// Hand-written SQL, in dependency order. See sql/README.md for the convention.
extension_sql_file!("../../sql/schema/10_tables.sql", name = "tables", requires = [clock::clock]);
extension_sql_file!(
    "../../sql/schema/20_policy.sql",
    name = "policy",
    requires = ["tables", window::policy_window_problem]
);
extension_sql_file!("../../sql/schema/25_scopes.sql", name = "scopes", requires = ["policy"]);
extension_sql_file!(
    "../../sql/schema/30_keys.sql",
    name = "keys",
    requires = ["tables", pricing::price_prefixes]
);
extension_sql_file!(
    "../../sql/schema/40_lifecycle.sql",
    name = "lifecycle",
    requires = [
        "keys",
        window::window_bounds,
        window::approx_duration,
        lifecycle::refuses,
        lifecycle::metric_amount,
        lifecycle::key_refusal
    ]
);
extension_sql_file!("../../sql/schema/45_batch.sql", name = "batch", requires = ["lifecycle"]);
extension_sql_file!("../../sql/schema/50_admin.sql", name = "admin", requires = ["lifecycle"]);
extension_sql_file!("../../sql/schema/60_rollups.sql", name = "rollups", requires = ["tables"]);
extension_sql_file!("../../sql/schema/70_alerts.sql", name = "alerts", requires = ["tables"]);
extension_sql_file!("../../sql/schema/70_ledger.sql", name = "ledger", requires = ["admin", "rollups"]);
extension_sql_file!("../../sql/schema/90_roles.sql", name = "roles", finalize);

#[allow(non_snake_case)]
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::register();
    sweeper::register();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn extension_lives_in_schema_quota() {
        let schema = Spi::get_one::<String>(
            "SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
             WHERE e.extname = 'pg_quota'",
        );
        assert_eq!(schema, Ok(Some("quota".to_string())));
    }
}

/// Required by `cargo pgrx test`; must sit at the crate root.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
