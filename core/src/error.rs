//! Errors of the core crate.

/// A source could not keep running; the route stops with this error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The broker refused or could not be reached in a way retrying will not fix.
    #[error("{what}: {detail}")]
    Fatal {
        /// What was being done (e.g. "receiving from orders-consumer").
        what: String,
        /// The broker's or client's explanation.
        detail: String,
    },
}

/// A route stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The route's source failed.
    #[error("route {route}: {source}")]
    Source {
        /// The route's name.
        route: String,
        /// What the source reported.
        #[source]
        source: SourceError,
    },
    /// The source task panicked; a bug, reported instead of propagated.
    #[error("route {route}: source task ended abnormally: {detail}")]
    SourcePanicked {
        /// The route's name.
        route: String,
        /// The panic or cancellation message.
        detail: String,
    },
}

/// An error and its causes as one line, `outer: cause: root cause`, for logs and start
/// errors: client libraries wrap a refused connection in several layers, and their
/// `Debug` (what `{:?}` or an SDK's own context printer shows) runs to kilobytes of
/// request internals. A cause whose text the line already holds is left out, control
/// characters become spaces, and the line stops at 400 characters.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    const MAX: usize = 400;
    let mut line = String::new();
    let mut next = Some(e);
    while let Some(e) = next {
        let text: String = e
            .to_string()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let text = text.trim();
        if !text.is_empty() && !line.contains(text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(text);
        }
        next = e.source();
    }
    if line.chars().count() > MAX {
        line = line.chars().take(MAX).collect::<String>() + "…";
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("dispatch failure")]
    struct Outer(#[source] Middle);
    #[derive(Debug, thiserror::Error)]
    #[error("io error: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn causes_on_one_line_without_repeats() {
        let e = Outer(Middle(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection\nrefused",
        )));
        // The middle layer already quotes the root cause: it is not said twice.
        assert_eq!(
            error_chain(&e),
            "dispatch failure: io error: Connection refused"
        );
        let long = std::io::Error::other("x".repeat(1000));
        assert!(error_chain(&long).chars().count() <= 401);
    }
}
