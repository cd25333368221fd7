//! Connections: the accept loop and each connection's life, driven on hyper-util's server builder
//! (HTTP/1.1, and HTTP/2 with prior knowledge, on one port) instead of `axum::serve`, for limits
//! that `axum::serve` does not have:
//!
//! - **a cap on open connections** (`max_connections`): at the cap the server stops accepting, so
//!   further connections *wait* in the kernel's listen backlog until one closes (beyond the
//!   backlog the kernel drops their SYNs and clients retry); they are never answered with an
//!   error. The cap is lowered to fit the process's open-file limit, which is raised to its hard
//!   limit at start.
//! - **a header read timeout** (`header_read_timeout`): a new connection must deliver its first
//!   request head within it, else it is closed (slowloris: half a request line, then nothing).
//! - **an idle keep-alive timeout** (`keep_alive_timeout`): after a response, the next request
//!   head must arrive within it, else the connection is closed.
//! - **concurrent requests per connection** (`http2_max_concurrent_streams`): HTTP/2 streams
//!   beyond it are refused (`REFUSED_STREAM`, which clients retry); HTTP/1.1 serves one request
//!   at a time.
//!
//! A connection with a request in flight (its head read, its response body not yet finished) is
//! never closed by these timers: a long stream runs as long as it runs. On shutdown the listener
//! closes at once, idle connections close, and connections with requests in flight finish them
//! (streams run to their end) before the server returns.
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

/// The connection settings of `[server]` (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionLimits {
    /// A new connection's first request head must arrive within this.
    pub header_read_timeout: Duration,
    /// After a response, the next request head must arrive within this.
    pub keep_alive_timeout: Duration,
    /// Most connections open at once; more wait to be accepted.
    pub max_connections: usize,
    /// Most requests in flight on one HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
}

impl ConnectionLimits {
    pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 10;
    /// Longer than the 60 s idle timeout of common load balancers (AWS ALB, GCP), so that the
    /// balancer, not the server, closes an idle connection first (no request is sent on a
    /// connection the server is closing).
    pub const DEFAULT_KEEP_ALIVE_TIMEOUT_SECS: u64 = 75;
    pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
    pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(Self::DEFAULT_HEADER_READ_TIMEOUT_SECS),
            keep_alive_timeout: Duration::from_secs(Self::DEFAULT_KEEP_ALIVE_TIMEOUT_SECS),
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            http2_max_concurrent_streams: Self::DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains (module docs).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max_connections = fit_to_open_file_limit(limits.max_connections);
    tracing::info!(
        addr = %listener.local_addr()?,
        max_connections,
        header_read_timeout_s = limits.header_read_timeout.as_secs_f64(),
        keep_alive_timeout_s = limits.keep_alive_timeout.as_secs_f64(),
        "inferd listening"
    );
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(limits.http2_max_concurrent_streams);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(max_connections));
    // `stop` tells the connections to shut down; every connection task holds a `done` receiver,
    // so `done_tx.closed()` resolves once the last one has ended.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_cap_warning: Option<Instant> = None;
    loop {
        if slots.available_permits() == 0 && last_cap_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            tracing::warn!(max_connections, "connection cap reached: new connections wait to be accepted");
            last_cap_warning = Some(Instant::now());
        }
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _addr)) => stream,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // TCP_NODELAY: a streamed token is a small write that must leave at once, not wait for
        // the client's acknowledgement of the previous one (Nagle's algorithm).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let (builder, router, stop, done) = (builder.clone(), router.clone(), stop_rx.clone(), done_rx.clone());
        tokio::spawn(async move {
            serve_connection(stream, &builder, router, limits, stop).await;
            drop(permit);
            drop(done);
        });
    }
    tracing::info!("not accepting connections any more; finishing requests in flight");
    drop(listener);
    drop(done_rx);
    let _ = stop_tx.send(true);
    done_tx.closed().await;
    Ok(())
}

/// Accept errors: a connection that died before it was accepted is nothing; anything else (out
/// of file descriptors, out of memory) is logged and retried after a pause, as hyper 0.14 did.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 200 ms");
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Requests in flight on one connection, how many have finished, and a wake-up when the count
/// of those in flight falls to zero.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    finished: AtomicUsize,
    idle: Notify,
}

/// Held from the moment a request's head is read until its response body is finished or dropped.
struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(f: &Arc<InFlight>) -> Self {
        f.count.fetch_add(1, Ordering::SeqCst);
        Self(f.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_one();
        }
    }
}

/// A response body that keeps its request counted as in flight until it is done.
struct GuardedBody {
    inner: Body,
    _guard: InFlightGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves one connection until it ends, times out idle or is drained at shutdown.
async fn serve_connection(
    stream: TcpStream,
    builder: &auto::Builder<TokioExecutor>,
    router: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    let in_flight = Arc::new(InFlight::default());
    let service = {
        let in_flight = in_flight.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = InFlightGuard::new(&in_flight);
            let router = router.clone();
            async move {
                let resp = match router.oneshot(req.map(Body::new)).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(resp.map(|inner| GuardedBody { inner, _guard: guard }))
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    // Until the first request the header read timeout runs from the accept; after each response
    // the keep-alive timeout runs from its end. Neither runs while a request is in flight.
    let mut deadline = Instant::now() + limits.header_read_timeout;
    let mut seen = 0;
    let mut draining = false;
    loop {
        let busy = in_flight.count.load(Ordering::SeqCst) > 0;
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = in_flight.idle.notified() => {}
            _ = tokio::time::sleep_until(deadline), if !busy => {
                // Nothing in flight and nothing finished since the timer was set: no request
                // head came in time (the response before, if any, left long ago).
                if in_flight.count.load(Ordering::SeqCst) == 0 && in_flight.finished.load(Ordering::SeqCst) == seen {
                    tracing::debug!(draining, "closing a connection that sent no request head in time");
                    return;
                }
            }
            _ = stop.changed(), if !draining => {
                // hyper closes an idle HTTP/1 connection at once and lets one with a request in
                // flight finish it; one half way through a request head gets DRAIN_GRACE.
                draining = true;
                conn.as_mut().graceful_shutdown();
                deadline = deadline.min(Instant::now() + DRAIN_GRACE);
            }
        }
        let finished = in_flight.finished.load(Ordering::SeqCst);
        if finished != seen {
            seen = finished;
            deadline = Instant::now() + if draining { DRAIN_GRACE } else { limits.keep_alive_timeout };
        }
    }
}

/// At shutdown, how long a connection with no request in flight may take to close by itself.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// `wanted`, lowered to what the process's open-file limit leaves for connections (after raising
/// the soft limit to the hard one, and keeping what is open now plus 64 for files the server
/// opens later, e.g. adapters). Logs a warning when it has to lower it.
pub fn fit_to_open_file_limit(wanted: usize) -> usize {
    #[cfg(unix)]
    {
        let Some(limit) = raise_open_file_limit() else { return wanted };
        let open = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(32);
        let room = (limit as usize).saturating_sub(open + 64).max(1);
        if room < wanted {
            tracing::warn!(
                max_connections = wanted,
                open_file_limit = limit,
                using = room,
                "the open-file limit leaves room for fewer connections than max_connections; raise it (ulimit -n)"
            );
            return room;
        }
    }
    wanted
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns the soft limit now in force.
#[cfg(unix)]
fn raise_open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    Some(lim.rlim_cur as u64)
}
