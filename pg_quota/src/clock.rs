//! The one clock every quota computation reads.
use crate::gucs::FAKE_NOW;
use pgrx::prelude::*;

/// `now()` unless the superuser-only GUC `pg_quota.fake_now` holds a timestamp.
#[pg_extern(stable, parallel_safe)]
pub fn clock() -> TimestampWithTimeZone {
    match FAKE_NOW.get() {
        Some(text) if !text.as_bytes().is_empty() => parse_timestamptz(&text),
        _ => transaction_start(),
    }
}

fn transaction_start() -> TimestampWithTimeZone {
    // SAFETY: reads the current transaction's start timestamp; always valid inside a backend.
    let ts = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    TimestampWithTimeZone::try_from(ts).expect("transaction start is a finite timestamp")
}

fn parse_timestamptz(text: &std::ffi::CStr) -> TimestampWithTimeZone {
    // Postgres' own input function: same formats and errors as '...'::timestamptz.
    // SAFETY: timestamptz_in takes (cstring, oid, typmod); the CStr outlives the call.
    unsafe {
        pgrx::direct_function_call::<TimestampWithTimeZone>(
            pg_sys::timestamptz_in,
            &[
                Some(pg_sys::Datum::from(text.as_ptr())),
                Some(pg_sys::Datum::from(pg_sys::InvalidOid)),
                Some(pg_sys::Datum::from(-1i32)),
            ],
        )
    }
    .expect("timestamptz_in never returns NULL")
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn fake_now_moves_the_clock_and_empty_restores_now() {
        Spi::run("SET pg_quota.fake_now = '2031-02-03 04:05:06+00'").unwrap();
        let moved = Spi::get_one::<bool>(
            "SELECT quota.clock() = '2031-02-03 04:05:06+00'::timestamptz",
        );
        assert_eq!(moved, Ok(Some(true)));
        Spi::run("SET pg_quota.fake_now = ''").unwrap();
        let real = Spi::get_one::<bool>("SELECT quota.clock() = now()");
        assert_eq!(real, Ok(Some(true)));
    }

    #[pg_test(error = "invalid input syntax for type timestamp with time zone: \"yesterday-ish\"")]
    fn a_garbled_fake_now_is_an_error_not_a_silent_now() {
        Spi::run("SET pg_quota.fake_now = 'yesterday-ish'").unwrap();
        Spi::get_one::<TimestampWithTimeZone>("SELECT quota.clock()").unwrap();
    }
}
