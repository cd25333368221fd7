//! The OpenAI-compatible HTTP surface (axum): router, layers, graceful serving.
//!
//! Handlers are thin: parse (`extract`), validate (`validate`), submit and answer (`respond`,
//! with the pure chunk state machines in `sse` and `collect`). Every error is OpenAI-shaped
//! (`error`), including 401/403/404/405/408/413/504 and panics. Who may call what is in `auth`,
//! which browser origins in `cors`, and the connection limits in `conn`.
pub mod auth;
pub mod chat;
pub mod collect;
pub mod completions;
pub mod conn;
pub mod cors;
pub mod error;
pub mod extract;
pub mod lora;
pub mod messages;
pub mod metrics;
pub mod models;
pub mod respond;
pub mod sse;
pub mod state;
pub mod status_counts;
pub mod structured;
pub mod tokenize;
pub mod types;
pub mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_socket;

use std::future::Future;
use std::panic::AssertUnwindSafe;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use futures::FutureExt;
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use state::{AppState, Generator, Limits, ModelEntry};

use extract::BodyRules;

/// The full router: `/v1/*`, `/tokenize` and `/detokenize` behind the user keys (when any are
/// set), the adapter loading endpoints behind the admin key (`auth`), `/health`, `/ready` and
/// `/metrics` open (`/metrics` optionally behind a key), with JSON 404/405/413, a panic guard and,
/// outermost, CORS when origins are configured.
pub fn router(state: AppState) -> Router {
    let limit = state.limits.max_body_bytes;
    let user = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::retrieve))
        .route("/v1/lora_adapters", get(lora::list))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_user));
    let admin = Router::new()
        .route("/v1/load_lora_adapter", post(lora::load))
        .route("/v1/unload_lora_adapter", post(lora::unload))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_admin));
    let metrics = Router::new()
        .route("/metrics", get(metrics::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_metrics));
    let cors = cors::layer(&state.limits.cors_allowed_origins);
    let body = BodyRules { limit, read_timeout: state.limits.body_read_timeout };
    let router = Router::new()
        .merge(user)
        .merge(admin)
        .merge(metrics)
        .route("/health", get(models::health))
        .route("/ready", get(models::ready))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(Extension(body))
        .layer(middleware::from_fn(catch_panic))
        .layer(middleware::from_fn_with_state(state.clone(), status_counts::count))
        .layer(TraceLayer::new_for_http())
        .with_state(state);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

/// Last line of defence: a panicking handler becomes a JSON 500 instead of a dropped connection.
async fn catch_panic(req: Request, next: Next) -> Response {
    match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(panic = %what, "handler panicked");
            ApiError::internal("The server had an error while processing your request.").into_response()
        }
    }
}

/// Binds `host:port` and serves until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    state: AppState,
    host: &str,
    port: u16,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = bind(host, port).await?;
    serve_on(listener, state, shutdown).await
}

/// Connections the kernel completes and queues before the server accepts them (clamped by the
/// kernel to net.core.somaxconn, 4096 by default on Linux). tokio's default, 1024, overflowed
/// under a flood of 3,000 connections on 2 CPUs: each overflow costs a client a 1 s SYN retry.
const LISTEN_BACKLOG: u32 = 4096;

/// The first of `host`'s addresses that binds, with SO_REUSEADDR (as std's bind sets it) and
/// [`LISTEN_BACKLOG`].
async fn bind(host: &str, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        #[cfg(unix)]
        sock.set_reuseaddr(true)?;
        match sock.bind(addr).and_then(|()| sock.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, format!("{host} resolves to no address"))))
}

/// `serve` on an already bound listener (tests bind port 0 and read the address back), with
/// the connection limits of `state.limits.connections`.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.limits.connections;
    conn::serve(listener, router(state), limits, shutdown).await
}

/// Resolves on Ctrl-C or SIGTERM: pass it to `serve` for graceful shutdown.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received, draining requests");
}
