//! Which price a model name is charged at, so that no dated snapshot or alias of a priced model
//! goes unbilled.
//!
//! A model `m` is priced, in this order, by:
//! 1. its own row in `quota.model_price` (an exact price always wins);
//! 2. its row in `quota.model_alias` (an explicit alias names the priced model);
//! 3. the longest priced model `p` such that `m` starts with `p` followed by `-`, `@` or `:`
//!    (`gpt-4o-mini-2024-07-18`, `gpt-4o-mini@2024-07-18` and `gpt-4o-mini:ft-acme` price as
//!    `gpt-4o-mini`; `gpt-4o-2024-08-06` and `gpt-4o-minix` as `gpt-4o`; `gpt-4ox` and
//!    `gpt-4` as nothing).
//!
//! Only whole name parts count, and the longest wins, so a snapshot never prices as a shorter
//! sibling when its own family is priced. A model priced by none of them is unpriced.

/// The characters that end a base model's name inside a longer one.
pub const SEPARATORS: [char; 3] = ['-', '@', ':'];

/// The prefixes of `model` that rule 3 may price it as, longest first: each ends just before a
/// separator, and none is empty. The model itself is not among them (rule 1 covers it).
pub fn price_prefixes(model: &str) -> Vec<&str> {
    let mut prefixes: Vec<&str> = model
        .char_indices()
        .filter(|&(i, c)| i > 0 && SEPARATORS.contains(&c))
        .map(|(i, _)| &model[..i])
        .collect();
    prefixes.reverse();
    prefixes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rule 3 on its own, against a set of priced names.
    fn priced_as<'a>(model: &'a str, priced: &[&str]) -> Option<&'a str> {
        price_prefixes(model).into_iter().find(|p| priced.contains(p))
    }

    #[test]
    fn dated_snapshots_price_as_their_longest_priced_base() {
        let priced = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet"];
        assert_eq!(priced_as("gpt-4o-mini-2024-07-18", &priced), Some("gpt-4o-mini"));
        assert_eq!(priced_as("gpt-4o-2024-08-06", &priced), Some("gpt-4o"));
        assert_eq!(priced_as("gpt-4o-mini@2024-07-18", &priced), Some("gpt-4o-mini"));
        assert_eq!(priced_as("gpt-4o-mini:ft-acme:1", &priced), Some("gpt-4o-mini"));
        assert_eq!(priced_as("claude-3-5-sonnet-20241022", &priced), Some("claude-3-5-sonnet"));
    }

    #[test]
    fn only_whole_name_parts_count() {
        let priced = ["gpt-4o", "gpt-4o-mini"];
        assert_eq!(priced_as("gpt-4o-minix", &priced), Some("gpt-4o"));
        assert_eq!(priced_as("gpt-4ox", &priced), None);
        assert_eq!(priced_as("gpt-4", &priced), None);
        assert_eq!(priced_as("-gpt-4o", &priced), None);
    }

    #[test]
    fn prefixes_come_longest_first_and_never_empty() {
        assert_eq!(price_prefixes("a-b@c:d"), vec!["a-b@c", "a-b", "a"]);
        assert_eq!(price_prefixes("-a"), Vec::<&str>::new());
        assert_eq!(price_prefixes("plain"), Vec::<&str>::new());
        assert_eq!(price_prefixes("é-ü"), vec!["é"]);
    }
}
