//! The error type of server-tier and its HTTP form.

use axum::response::{IntoResponse, Response};
use http::StatusCode;

/// Everything that can go wrong while configuring the proxy, handling a request or
/// patching the model behind it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A rules file or rule body is not valid TOML or JSON, or names an unknown field.
    #[error("invalid rules: {0}")]
    Rules(String),
    /// A rule is well-formed but cannot be used (a bad regex, an empty name, min > max).
    #[error("rule {rule:?}: {reason}")]
    InvalidRule {
        /// The rule's name.
        rule: String,
        /// What is wrong.
        reason: String,
    },
    /// Two rules share a name.
    #[error("a rule named {0:?} already exists")]
    DuplicateRule(String),
    /// No rule has this name.
    #[error("no rule named {0:?}")]
    NoSuchRule(String),
    /// A request body is not what the route takes (malformed JSON, wrong shape).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A request body is larger than the configured limit.
    #[error("request body larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A request body is not JSON.
    #[error("unsupported content type {0:?}: expected application/json")]
    UnsupportedMediaType(String),
    /// The admin bearer token is missing or wrong.
    #[error("missing or wrong admin bearer token")]
    Unauthorized,
    /// Nothing is at this path or under this id.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request conflicts with the current state (a locked range, a patch conflict,
    /// no model attached, a drain that did not finish in time).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The upstream server could not be reached or broke the exchange.
    #[error("upstream failure: {0}")]
    Upstream(String),
    /// The upstream server did not answer in time.
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    /// A live patch failed in memory-tier.
    #[error("live patch")]
    Memory(#[from] memory_tier::Error),
    /// Reading the model's header failed.
    #[error("model file")]
    Bytes(#[from] byte_tier::Error),
    /// A configuration value is unusable (an upstream URL, a listen address, a token file).
    #[error("configuration: {0}")]
    Config(String),
    /// An operating-system call failed.
    #[error("{action}")]
    Io {
        /// What was being done.
        action: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The proxy does not serve generation requests now (a fleet member that has not
    /// yet converged to its fleet's desired state).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A background task failed to finish (it panicked or was cancelled).
    #[error("background task failed: {0}")]
    Task(String),
}

/// The result type of server-tier.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Rules(_) | Error::InvalidRule { .. } | Error::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            Error::DuplicateRule(_) | Error::Conflict(_) => StatusCode::CONFLICT,
            Error::NoSuchRule(_) | Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Upstream(_) => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Memory(error) => Error::status_of_memory(error),
            Error::Bytes(_) | Error::Config(_) | Error::Io { .. } | Error::Task(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn status_of_memory(error: &memory_tier::Error) -> StatusCode {
        // A rolled-back transaction answers with its cause's status.
        use memory_tier::Error as M;
        match error {
            M::NoSuchTensor(_) | M::NoSuchPatch(_) => StatusCode::NOT_FOUND,
            M::Conflict { .. } | M::AlreadyApplied(_) | M::Disabled(_) => StatusCode::CONFLICT,
            M::OutsideRegion { .. } | M::OutsideTensor { .. } | M::InvalidPatch { .. } => {
                StatusCode::BAD_REQUEST
            }
            M::RolledBack { source, .. } => Error::status_of_memory(source),
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short machine-readable name of the error's kind, used in JSON error bodies.
    pub fn code(&self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::CONFLICT => "conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::BAD_GATEWAY => "upstream_failure",
            StatusCode::GATEWAY_TIMEOUT => "upstream_timeout",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "internal_error",
        }
    }

    /// The whole error chain on one line.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        error_response(self.status(), self.code(), &self.chain())
    }
}

/// A JSON error body `{"error": {"code": ..., "message": ..., "status": ...}}`.
pub(crate) fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "error": {"code": code, "message": message, "status": status.as_u16()}
    });
    (status, axum::Json(body)).into_response()
}
