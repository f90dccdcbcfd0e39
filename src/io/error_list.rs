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

/// How many names a one-line message lists before "…".
pub const MAX_NAMED: usize = 5;

/// The first [`MAX_NAMED`] of `items` joined with ", ", then ", …" when there are more.
pub fn first_few<S: AsRef<str>>(items: &[S]) -> String {
    let shown: Vec<&str> = items.iter().take(MAX_NAMED).map(AsRef::as_ref).collect();
    let more = if items.len() > MAX_NAMED { ", …" } else { "" };
    format!("{}{more}", shown.join(", "))
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

    #[test]
    fn one_line_lists_name_the_first_five() {
        assert_eq!(first_few(&["a", "b"]), "a, b");
        let seven: Vec<String> = (1..=7).map(|i| i.to_string()).collect();
        assert_eq!(first_few(&seven), "1, 2, 3, 4, 5, …");
        assert_eq!(first_few::<&str>(&[]), "");
    }
}
