//! The flow shared by chat and text completions once a request is validated: submit one sequence
//! per choice, merge their event channels, and answer as SSE or as one JSON object.
//!
//! The receivers live only inside the merged stream, which the SSE body (or the handler future)
//! owns: when the client disconnects that is dropped, the receivers with it, which cancels the
//! sequences in the engine.
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use rand::distr::{Alphanumeric, SampleString};
use tokio::sync::mpsc::Receiver;
use tokio_stream::wrappers::ReceiverStream;

use super::collect::Collector;
use super::error::ApiError;
use super::sse::{Frame, Mode, ResponseMeta, StreamAssembler};
use super::state::{unix_now, AppState, Generator};
use super::validate::Validated;
use crate::engine::{Event, GenRequest};

/// Events of all choices: `(choice index, Some(event))`, and `(index, None)` once that choice's
/// channel has closed.
pub type Merged = Pin<Box<dyn Stream<Item = (usize, Option<Event>)> + Send>>;

/// Fresh response metadata with an id like `chatcmpl-<24 random chars>`.
pub fn new_meta(state: &AppState, prefix: &str, model: &str) -> ResponseMeta {
    let rand = Alphanumeric.sample_string(&mut rand::rng(), 24);
    ResponseMeta {
        id: format!("{prefix}-{rand}"),
        created: unix_now(),
        model: model.to_string(),
        system_fingerprint: state.system_fingerprint.clone(),
    }
}

/// Queues every choice. If one is refused, the ones already queued are dropped (cancelled).
pub fn submit_all(generator: &dyn Generator, requests: Vec<GenRequest>) -> Result<Vec<Receiver<Event>>, ApiError> {
    requests.into_iter().map(|r| generator.submit(r).map_err(ApiError::from)).collect()
}

/// Interleaves the choices' channels as events arrive.
pub fn merge(receivers: Vec<Receiver<Event>>) -> Merged {
    let streams = receivers.into_iter().enumerate().map(|(i, rx)| {
        ReceiverStream::new(rx).map(move |e| (i, Some(e))).chain(stream::once(async move { (i, None) })).boxed()
    });
    stream::select_all(streams).boxed()
}

/// Runs a validated request and answers it. A non-streaming answer not complete within
/// `deadline` (from now, when the request is queued) is a 504 and its sequences are cancelled;
/// streams have no deadline.
pub async fn respond(
    mode: Mode,
    meta: ResponseMeta,
    v: Validated,
    generator: Arc<dyn Generator>,
    deadline: Option<std::time::Duration>,
) -> Response {
    let n = v.requests.len();
    let receivers = match submit_all(generator.as_ref(), v.requests) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    drop(generator);
    let merged = merge(receivers);
    if v.stream {
        let asm = StreamAssembler::new(meta, mode, n, v.prompt_tokens, v.include_usage, v.logprobs.is_some()).with_tools(v.tools.as_ref());
        stream_response(asm, merged).await
    } else {
        let col = Collector::new(mode, n, v.logprobs.is_some()).with_tools(v.tools.as_ref());
        let collect = collect_response(col, merged, meta, v.prompt_tokens);
        match deadline {
            // Dropping the collecting future drops the receivers, which cancels the sequences.
            Some(d) => match tokio::time::timeout(d, collect).await {
                Ok(resp) => resp,
                Err(_) => {
                    tracing::info!(deadline_s = d.as_secs_f64(), "non-streaming completion over its deadline: cancelled");
                    ApiError::deadline_exceeded(d.as_secs()).into_response()
                }
            },
            None => collect.await,
        }
    }
}

async fn collect_response(mut col: Collector, mut merged: Merged, meta: ResponseMeta, prompt_tokens: usize) -> Response {
    while let Some((i, ev)) = merged.next().await {
        match ev {
            Some(e) => col.push(i, e),
            None => col.closed(i),
        }
        if col.failed() {
            break;
        }
    }
    drop(merged);
    match col.finish(meta, prompt_tokens) {
        Ok(body) => axum::Json(body).into_response(),
        Err(msg) => ApiError::internal(msg).into_response(),
    }
}

/// Waits for the first event so an engine failure before any output is still a proper 500, then
/// streams the rest as SSE with keep-alive comments.
async fn stream_response(mut asm: StreamAssembler, mut merged: Merged) -> Response {
    let first = merged.next().await;
    match &first {
        Some((_, Some(Event::Error(msg)))) => return ApiError::internal(msg.clone()).into_response(),
        Some((_, None)) | None => {
            return ApiError::internal("generation ended unexpectedly: the model worker stopped").into_response()
        }
        Some(_) => {}
    }
    let body = async_stream::stream! {
        let mut pending = first;
        loop {
            let item = match pending.take() {
                Some(item) => Some(item),
                None => merged.next().await,
            };
            let Some((i, ev)) = item else { break };
            let frames = match ev {
                Some(e) => asm.push(i, e),
                None => asm.closed(i),
            };
            for f in frames {
                yield Ok::<_, Infallible>(to_sse(f));
            }
            if asm.is_ended() {
                break;
            }
        }
        for f in asm.error("generation ended unexpectedly") {
            yield Ok(to_sse(f));
        }
    };
    Sse::new(body).keep_alive(KeepAlive::default()).into_response()
}

fn to_sse(f: Frame) -> SseEvent {
    match f {
        Frame::Data(v) => SseEvent::default().data(v.to_string()),
        Frame::Done => SseEvent::default().data("[DONE]"),
    }
}

/// Runs CPU-bound validation (templating, tokenising) off the async runtime.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("validation task failed: {e}")))?
}
