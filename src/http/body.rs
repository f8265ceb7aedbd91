//! The JSON body of a request, read whatever its Content-Type says.
//!
//! Scripts post JSON with `curl --data` (form Content-Type) or none at all;
//! the body is what matters. Cross-site posts are refused by `auth` before
//! any body is read.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::MAX_BODY;
use super::error::ApiError;

/// A request body parsed as JSON: 400 when it is not JSON, 422 when it is
/// JSON of the wrong shape, 413 beyond [`MAX_BODY`].
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!("request body is larger than {MAX_BODY} bytes"))
            } else if timed_out(&rejection) {
                ApiError::RequestTimeout("the request body stopped arriving".into())
            } else {
                ApiError::BadRequest(rejection.body_text())
            }
        })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|err| match err.classify() {
            serde_json::error::Category::Data => ApiError::Unprocessable(format!("invalid request body: {err}")),
            _ => ApiError::BadRequest(format!("request body is not JSON: {err}")),
        })
    }
}

/// The body stalled longer than the connection allows (see `connections`).
fn timed_out(rejection: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(rejection);
    while let Some(err) = source {
        if err.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = err.source();
    }
    false
}
