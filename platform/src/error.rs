//! The platform's one error type and its HTTP mapping.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use layer_protocol::error::{ErrorBody, FieldProblem};

/// Every way a platform operation can fail. Each variant maps to one HTTP
/// status and one stable `code`.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The request or resource is malformed; `problems` lists every field.
    #[error("{message}")]
    Invalid { code: &'static str, message: String, problems: Vec<FieldProblem> },
    /// The request uses a feature this store does not offer.
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The database is overloaded, restarting or unreachable: try again.
    #[error("{0}")]
    Unavailable(String),
    /// PostgreSQL binaries, data directory or server problems at start-up.
    #[error("{0}")]
    Setup(String),
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A bug or a task that stopped unexpectedly.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = PlatformError> = std::result::Result<T, E>;

impl PlatformError {
    /// A 400 about one field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let problem = FieldProblem { field: field.into(), message: message.into() };
        Self::Invalid { code: "invalid_request", message: problem.to_string(), problems: vec![problem] }
    }

    /// A 400 listing several problems; the message names them all.
    pub fn invalid_fields(code: &'static str, problems: Vec<FieldProblem>) -> Self {
        let message = problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        Self::Invalid { code, message, problems }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::Unsupported(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Setup(_) | Self::Database(_) | Self::Migrate(_) | Self::Io(_) | Self::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { code, .. } => code,
            Self::Unsupported(_) => "unsupported",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::Unavailable(_) => "unavailable",
            Self::Setup(_) | Self::Database(_) | Self::Migrate(_) | Self::Io(_) | Self::Internal(_) => "internal",
        }
    }
}

/// PostgreSQL errors are translated once, here, by SQLSTATE.
impl From<sqlx::Error> for PlatformError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e
            && let Some(state) = db.code()
        {
            let msg = db.message().to_string();
            match state.as_ref() {
                "23505" => return Self::Conflict(format!("already exists: {msg}")),
                // A reference to something that is gone (deleted meanwhile):
                // PostgreSQL's detail names it, `Key (function_id)=(x) is
                // not present in table "functions"`.
                "23503" => {
                    let detail = db
                        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .and_then(|d| d.detail())
                        .map(|d| d.replace('"', ""))
                        .unwrap_or(msg);
                    return Self::Conflict(format!("what this refers to no longer exists: {detail}"));
                }
                "2201B" => {
                    return Self::invalid("filters", format!("invalid regular expression: {msg}"));
                }
                "22P02" | "22023" | "2202E" | "22003" => return Self::invalid("", msg),
                // A NUL byte (text and jsonb hold none) that no check caught first.
                "22021" | "22P05" => {
                    return Self::invalid("", format!("{}: {msg}", layer_protocol::validate::NUL_MESSAGE));
                }
                "54001" => return Self::invalid("filters", "filter is too complex to evaluate"),
                "57014" => {
                    return Self::Unavailable("the query was cancelled (statement timeout); narrow it or retry".into());
                }
                "40001" | "40P01" => {
                    return Self::Unavailable("a concurrent write conflicted; retry".into());
                }
                "53300" | "57P01" | "57P02" | "57P03" => {
                    return Self::Unavailable(format!("database unavailable: {msg}"));
                }
                _ => {}
            }
        }
        // What is unavailable, in the platform's words: the OS's error text
        // goes to the log, not to the client.
        match e {
            sqlx::Error::PoolTimedOut => {
                Self::Unavailable("database unavailable: no connection came free in time; retry".into())
            }
            sqlx::Error::PoolClosed => Self::Unavailable("database unavailable: the platform is stopping".into()),
            sqlx::Error::Io(io) => {
                tracing::warn!(error = %io, "the connection to PostgreSQL failed");
                Self::Unavailable("database unavailable: the connection to PostgreSQL failed; retry".into())
            }
            other => Self::Database(other),
        }
    }
}

/// Whether PostgreSQL cancelled the statement (its `statement_timeout`
/// passed), for the callers that record that outcome instead of failing.
pub fn is_query_cancelled(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("57014"))
}

tokio::task_local! {
    /// The request id of the request being served, for error bodies.
    pub static REQUEST_ID: String;
}

/// The HTTP face of [`PlatformError`].
#[derive(Debug)]
pub struct ApiError(pub PlatformError);

impl<E: Into<PlatformError>> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = e.status();
        let request_id = REQUEST_ID.try_with(Clone::clone).ok();
        let message = if status.is_server_error() && !matches!(e, PlatformError::Unavailable(_)) {
            tracing::error!(error = %e, request_id = request_id.as_deref().unwrap_or(""), "request failed");
            "internal error; the platform log has the details".to_string()
        } else {
            e.to_string()
        };
        let (field, errors) = match &e {
            PlatformError::Invalid { problems, .. } => (
                problems.first().map(|p| p.field.clone()).filter(|f| !f.is_empty()),
                if problems.len() > 1 { problems.clone() } else { Vec::new() },
            ),
            _ => (None, Vec::new()),
        };
        let body =
            ErrorBody { error: e.code().to_string(), code: e.code().to_string(), message, field, errors, request_id };
        let mut response = (status, axum::Json(body)).into_response();
        if status == axum::http::StatusCode::UNAUTHORIZED {
            // RFC 6750: how to authenticate.
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"layer\""),
            );
        }
        response
    }
}
