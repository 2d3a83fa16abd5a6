//! One line for an error and its causes.
//!
//! Error messages in this crate often name their cause (`{path}: {source}`)
//! and also expose it as [`Error::source`], as thiserror's `#[source]`
//! does; printing the whole chain naively then repeats the cause. The line
//! built here gives each cause once.

use std::error::Error;

/// `err` and its causes joined by `": "`, leaving out a cause whose text
/// the line already ends with.
pub fn error_line(err: &(dyn Error + 'static)) -> String {
    let mut chain = Vec::new();
    let mut next = Some(err);
    while let Some(err) = next {
        chain.push(err);
        next = err.source();
    }
    chain_line(chain)
}

/// The same for a chain of errors given in order, outermost first (as
/// `anyhow::Error::chain` yields them).
pub fn chain_line<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut line = String::new();
    for err in chain {
        let text = err.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Named {
        path: String,
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("restore of {0}")]
    struct Outer(String, #[source] Named);

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let inner = Named {
            path: "/nonexistent".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let err = Outer("/nonexistent".into(), inner);
        assert_eq!(
            error_line(&err),
            "restore of /nonexistent: /nonexistent: No such file or directory (os error 2)"
        );
    }
}
