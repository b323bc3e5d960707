//! Bounds on what a client may send to the request lifecycle, checked before anything is read
//! or written: every argument of `quota.admit` and `quota.settle` is bounded, so that no input
//! costs more than its size, breaks an index (a b-tree entry holds about 2.7 kB), or overflows
//! arithmetic (`est + max_out`, `input + output`).
//!
//! | argument                                   | refused when                                   |
//! | ------------------------------------------ | ---------------------------------------------- |
//! | `model`                                    | empty, longer than 256 bytes, a control char   |
//! | `request_id`                               | empty, longer than 200 bytes                   |
//! | token counts (admit's estimates, settle's) | negative, above [`MAX_TOKENS`], or a sum that  |
//! |                                            | overflows a bigint                             |

use std::fmt;

/// Longest model name, in bytes (UTF-8).
pub const MAX_MODEL_BYTES: usize = 256;
/// Longest request id, in bytes (UTF-8).
pub const MAX_REQUEST_ID_BYTES: usize = 200;
/// Largest token count of one request (a trillion): far beyond any model's context, and small
/// enough that the daily rollups (bigint sums) cannot overflow.
pub const MAX_TOKENS: i64 = 1_000_000_000_000;
// The largest sums the engine forms (est + max_out; input + output + cached) cannot overflow,
// nor can a day's rollup of more than nine million requests at the bound.
const _: () = assert!(MAX_TOKENS.checked_mul(3).is_some() && i64::MAX / MAX_TOKENS > 9_000_000);

/// An argument of a lifecycle call that is refused, with its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    /// The argument as the SQL function names it, e.g. `"max_output_tokens"`.
    pub argument: &'static str,
    pub message: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.argument, self.message)
    }
}

impl std::error::Error for InputError {}

fn refuse<T>(argument: &'static str, message: impl Into<String>) -> Result<T, InputError> {
    Err(InputError {
        argument,
        message: message.into(),
    })
}

/// A model name: 1 to 256 bytes, no control characters.
pub fn check_model(model: &str) -> Result<(), InputError> {
    if model.is_empty() {
        return refuse("model", "required");
    }
    if model.len() > MAX_MODEL_BYTES {
        return refuse("model", format!("longer than {MAX_MODEL_BYTES} bytes ({} bytes)", model.len()));
    }
    if model.chars().any(char::is_control) {
        return refuse("model", "contains a control character");
    }
    Ok(())
}

/// A request id: 1 to 200 bytes.
pub fn check_request_id(request_id: &str) -> Result<(), InputError> {
    if request_id.is_empty() {
        return refuse("request_id", "required");
    }
    if request_id.len() > MAX_REQUEST_ID_BYTES {
        return refuse(
            "request_id",
            format!("longer than {MAX_REQUEST_ID_BYTES} bytes ({} bytes)", request_id.len()),
        );
    }
    Ok(())
}

/// Token counts, each named: none negative or above [`MAX_TOKENS`] (so no sum of them can
/// overflow). The first refused is reported.
pub fn check_tokens(counts: &[(&'static str, i64)]) -> Result<(), InputError> {
    for &(argument, n) in counts {
        if n < 0 {
            return refuse(argument, format!("must be >= 0, got {n}"));
        }
        if n > MAX_TOKENS {
            return refuse(argument, format!("must be at most {MAX_TOKENS}, got {n}"));
        }
    }
    Ok(())
}

/// The arguments of `quota.admit` after the key (checked by the lookup itself).
pub fn check_admit(request_id: &str, model: &str, est_input_tokens: i64, max_output_tokens: i64) -> Result<(), InputError> {
    check_request_id(request_id)?;
    check_model(model)?;
    check_tokens(&[
        ("est_input_tokens", est_input_tokens),
        ("max_output_tokens", max_output_tokens),
    ])
}

/// The arguments of `quota.settle`; missing usage (NULL) is allowed and settles unbilled.
pub fn check_settle(
    request_id: &str,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cached_tokens: Option<i64>,
) -> Result<(), InputError> {
    check_request_id(request_id)?;
    let named = [
        ("input_tokens", input_tokens),
        ("output_tokens", output_tokens),
        ("cached_tokens", cached_tokens),
    ];
    let present: Vec<(&'static str, i64)> = named.iter().filter_map(|&(a, n)| Some((a, n?))).collect();
    check_tokens(&present)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argument(r: Result<(), InputError>) -> &'static str {
        r.expect_err("refused").argument
    }

    #[test]
    fn model_names_are_bounded_in_bytes_and_free_of_control_characters() {
        assert!(check_model(&"m".repeat(256)).is_ok());
        assert!(check_model("gpt-4o-mini-2024-07-18").is_ok());
        assert!(check_model("modèle:ünïcode@v1").is_ok());
        assert_eq!(argument(check_model(&"m".repeat(257))), "model");
        // bytes, not characters: 129 two-byte characters are 258 bytes
        assert_eq!(argument(check_model(&"é".repeat(129))), "model");
        assert_eq!(argument(check_model("")), "model");
        for bad in ["a\nb", "a\u{0}b", "a\u{1b}[31m", "tab\there", "del\u{7f}"] {
            assert_eq!(argument(check_model(bad)), "model", "{bad:?}");
        }
    }

    #[test]
    fn request_ids_are_bounded() {
        assert!(check_request_id(&"r".repeat(200)).is_ok());
        assert_eq!(argument(check_request_id(&"r".repeat(201))), "request_id");
        assert_eq!(argument(check_request_id("")), "request_id");
    }

    #[test]
    fn token_counts_name_the_argument_refused() {
        assert!(check_admit("r", "m", 0, 0).is_ok());
        assert!(check_admit("r", "m", MAX_TOKENS, MAX_TOKENS).is_ok());
        assert_eq!(argument(check_admit("r", "m", -1, 0)), "est_input_tokens");
        assert_eq!(argument(check_admit("r", "m", 1, i64::MAX)), "max_output_tokens");
        assert_eq!(argument(check_admit("r", "m", 1, MAX_TOKENS + 1)), "max_output_tokens");
        assert_eq!(argument(check_settle("r", Some(1), Some(-1), None)), "output_tokens");
        assert_eq!(argument(check_settle("r", Some(i64::MAX), Some(1), None)), "input_tokens");
        assert_eq!(argument(check_settle("r", Some(1), Some(1), Some(-3))), "cached_tokens");
        assert!(check_settle("r", None, None, None).is_ok());
        let e = check_admit("r", "m", 1, i64::MAX).unwrap_err();
        assert_eq!(e.to_string(), format!("max_output_tokens: must be at most {MAX_TOKENS}, got {}", i64::MAX));
    }
}
