//! Query and path extractors whose rejections are API errors.
//!
//! axum's own `Query` and `Path` answer a parameter that does not parse
//! with a `text/plain` 400; README ("API") promises `{"detail": ...}` for
//! every error under `/api`. These wrappers keep axum's parsing and change
//! only the answer.

// The one place that may name axum's extractors (clippy.toml refuses them
// elsewhere), to wrap them.
#![allow(clippy::disallowed_types)]

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// The query string, deserialized: 400 `{"detail"}` when it does not fit.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))
    }
}

/// The route's path parameters, deserialized: 400 `{"detail"}` when one
/// does not fit (a percent-encoding that is not UTF-8, say). A mismatch
/// between the route and the type is a bug of ours: 500.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|rejection| {
                if rejection.status().is_server_error() {
                    ApiError::Internal(rejection.body_text())
                } else {
                    ApiError::BadRequest(rejection.body_text())
                }
            })
    }
}
