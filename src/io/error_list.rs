//! Error lists cut to their first few, for messages that report every bad line of a file.
//! A leaf: the modules whose errors [`crate::error::Error`] wraps use it without importing
//! the error type back.

/// How many bad lines or rows an error lists before "... and N more".
pub const MAX_SHOWN_ERRORS: usize = 20;

/// The first [`MAX_SHOWN_ERRORS`] of `errors`, then "... and N more"; with their count.
pub fn first_errors(errors: Vec<String>) -> (usize, Vec<String>) {
    let count = errors.len();
    let mut shown: Vec<String> = errors.into_iter().take(MAX_SHOWN_ERRORS).collect();
    if count > MAX_SHOWN_ERRORS {
        shown.push(format!("... and {} more", count - MAX_SHOWN_ERRORS));
    }
    (count, shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_error_lists_are_cut_with_a_count() {
        let (n, shown) = first_errors((0..25).map(|i| format!("line {i}")).collect());
        assert_eq!(n, 25);
        assert_eq!(shown.len(), MAX_SHOWN_ERRORS + 1);
        assert_eq!(shown.last().unwrap(), "... and 5 more");
        let (n, shown) = first_errors(vec!["one".into()]);
        assert_eq!((n, shown), (1, vec!["one".to_string()]));
    }
}
