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
