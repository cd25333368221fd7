//! CORS: which browser origins may call the server (`[server] cors_allowed_origins`).
//!
//! None by default: no CORS headers are sent, so a page on another origin cannot read any answer
//! (same-origin pages and non-browser clients are not affected). With a list, a request whose
//! `Origin` is in it gets `Access-Control-Allow-Origin: <that origin>` on every answer (errors
//! included, so the page can read a 401's message), and preflights (`OPTIONS` with
//! `Access-Control-Request-Method`) are answered before routing or key checks, allowing GET and
//! POST with whatever headers the page asks for (`Authorization`, `Content-Type`, the OpenAI
//! SDK's `x-stainless-*`). `"*"` allows every origin. Credentials (cookies) are never allowed:
//! the API key travels in `Authorization`.
use std::time::Duration;

use axum::http::{header, HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The CORS layer for these origins (already checked by [`check_origin`]); None for none.
pub fn layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([header::RETRY_AFTER])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

/// An allowed origin as browsers send it, `scheme://host[:port]` (lower-cased), or `*`.
pub fn check_origin(origin: &str) -> Result<String, String> {
    let o = origin.trim();
    if o == "*" {
        return Ok(o.to_string());
    }
    let lower = o.to_ascii_lowercase();
    let Some((scheme, rest)) = lower.split_once("://") else {
        return Err(format!("'{origin}' is not an origin: expected scheme://host[:port], e.g. https://app.example.com"));
    };
    if scheme.is_empty() || rest.is_empty() || rest.contains(['/', '?', '#', ' ', '*']) || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
        return Err(format!(
            "'{origin}' is not an origin: expected scheme://host[:port] with no path or trailing slash \
             (browsers send e.g. https://app.example.com)"
        ));
    }
    HeaderValue::from_str(&lower).map_err(|_| format!("'{origin}' is not a valid header value"))?;
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use super::check_origin;

    #[test]
    fn origins() {
        assert_eq!(check_origin("https://App.Example.com").unwrap(), "https://app.example.com");
        assert_eq!(check_origin("http://127.0.0.1:5173").unwrap(), "http://127.0.0.1:5173");
        assert_eq!(check_origin("*").unwrap(), "*");
        for bad in ["https://app.example.com/", "app.example.com", "https://", "http://x/path", "https://*.example.com", "://x"] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }
}
