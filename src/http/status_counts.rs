//! Responses counted by route and HTTP status, for `/metrics` (`inferd_http_requests_total`).
//!
//! The route label is the route's pattern (`/v1/models/{id}` for any model id) or `other` for
//! paths no route serves, so that clients cannot grow the label set.
use std::collections::BTreeMap;
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;

/// The routes of `super::router`, as labels.
const ROUTES: [&str; 13] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/lora_adapters",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/tokenize",
    "/detokenize",
    "/health",
    "/ready",
    "/metrics",
    "/v1/models/{id}",
    "other",
];

/// The label of a request path.
pub fn route_label(path: &str) -> &'static str {
    if let Some(r) = ROUTES[..11].iter().find(|r| **r == path) {
        return r;
    }
    if path.strip_prefix("/v1/models/").is_some_and(|id| !id.is_empty()) {
        return ROUTES[11];
    }
    ROUTES[12]
}

/// Responses by (route, status).
#[derive(Debug, Default)]
pub struct StatusCounts(Mutex<BTreeMap<(&'static str, u16), u64>>);

impl StatusCounts {
    pub fn record(&self, route: &'static str, status: u16) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()).entry((route, status)).or_default() += 1;
    }

    /// Every (route, status, count), sorted.
    pub fn snapshot(&self) -> Vec<(&'static str, u16, u64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(&(r, s), &n)| (r, s, n)).collect()
    }
}

/// Middleware: counts each response's status under its route (a stream counts when its head is
/// sent).
pub async fn count(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let resp = next.run(req).await;
    state.status_counts.record(route, resp.status().as_u16());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(route_label("/v1/chat/completions"), "/v1/chat/completions");
        assert_eq!(route_label("/v1/models/org/some-model"), "/v1/models/{id}");
        assert_eq!(route_label("/v1/models/"), "other");
        assert_eq!(route_label("/../../etc/passwd"), "other");
        let c = StatusCounts::default();
        c.record("/health", 200);
        c.record("/health", 200);
        c.record("other", 404);
        assert_eq!(c.snapshot(), vec![("/health", 200, 2), ("other", 404, 1)]);
    }
}
