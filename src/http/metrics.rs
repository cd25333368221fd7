//! `GET /metrics`: the engines' counters in Prometheus' text format (version 0.0.4), one series
//! per served model, like vLLM's `/metrics` (unauthenticated, outside `/v1`).
//!
//! Besides inferd's own `inferd_*` series, the latency histograms and the load gauges are also
//! exposed under vLLM's names, buckets and `model_name` label (`vllm:time_to_first_token_seconds`,
//! `vllm:num_requests_waiting`, ...), so that dashboards and autoscalers made for vLLM work.
use std::fmt::Write;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

use super::AppState;
use crate::engine::metrics::{HistogramSnapshot, Outcome};
use crate::engine::EngineStats;

/// (name, type, help, value) of each series.
fn series(s: &EngineStats) -> [(&'static str, &'static str, &'static str, f64); 14] {
    [
        ("inferd_requests_running", "gauge", "Sequences in the running batch (prefilling or decoding).", s.running as f64),
        ("inferd_requests_waiting", "gauge", "Sequences submitted and not yet running.", s.waiting as f64),
        ("inferd_prompt_tokens_total", "counter", "Prompt tokens run through the model.", s.prompt_tokens as f64),
        ("inferd_generation_tokens_total", "counter", "Tokens sampled.", s.generated_tokens as f64),
        ("inferd_engine_steps_total", "counter", "Forward steps (one batched pass over all scheduled rows).", s.steps as f64),
        ("inferd_engine_step_seconds_total", "counter", "Seconds spent in forward steps.", s.step_seconds),
        ("inferd_engine_sampling_seconds_total", "counter", "Seconds spent sampling, matching stops and detokenising after steps.", s.sample_seconds),
        ("inferd_engine_idle_seconds_total", "counter", "Seconds the worker waited with nothing to run (no sequence, or every one waiting on its client).", s.idle_seconds),
        ("inferd_num_preemptions_total", "counter", "Sequences preempted because the KV cache was full (they run again later).", s.preemptions as f64),
        ("inferd_engine_overlapped_tokens_total", "counter", "Tokens whose events (text, stop strings, logprobs) were made on the output thread while the next step ran.", s.overlapped_tokens as f64),
        ("inferd_engine_dropped_tokens_total", "counter", "Sampled tokens dropped unseen because their sequence had ended by a stop string found while the step ran.", s.dropped_tokens as f64),
        ("inferd_kv_cache_usage_perc", "gauge", "Fraction of the KV cache in use, 0 to 1 (0 when the cache is unbounded).", s.kv_cache_usage),
        ("inferd_prefix_cache_tokens_total", "counter", "Prompt tokens whose keys and values came from the prefix cache instead of being computed.", s.prefix_cache_tokens as f64),
        ("inferd_prefix_cache_bytes", "gauge", "Bytes of finished sequences' keys and values the prefix cache holds (bounded by prefix_cache_mb).", s.prefix_cache_bytes as f64),
    ]
}

/// A label value escaped for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// vLLM's gauge and counter names for the series of `series()` that vLLM has.
fn vllm_series(s: &EngineStats) -> [(&'static str, &'static str, &'static str, f64); 7] {
    [
        ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", s.running as f64),
        ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", s.waiting as f64),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage),
        ("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.", s.preemptions as f64),
        ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", s.prompt_tokens as f64),
        ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", s.generated_tokens as f64),
        ("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.", s.prefix_cache_tokens as f64),
    ]
}

/// The latency histograms, by vLLM name.
fn histograms(s: &EngineStats) -> [(&'static str, &'static str, &HistogramSnapshot); 4] {
    [
        ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", &s.latency.ttft),
        ("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", &s.latency.tpot),
        ("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", &s.latency.e2e),
        ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", &s.latency.queue),
    ]
}

/// Renders the metrics of `models` (id and counters).
pub fn render(models: &[(String, EngineStats)]) -> String {
    let mut out = String::new();
    let Some((_, first)) = models.first() else { return out };
    for (i, (name, kind, help, _)) in series(first).iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, stats) in models {
            let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", label(id), series(stats)[i].3);
        }
    }
    for (i, (name, kind, help, _)) in vllm_series(first).iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, stats) in models {
            let _ = writeln!(out, "{name}{{model_name=\"{}\"}} {}", label(id), vllm_series(stats)[i].3);
        }
    }
    let name = "vllm:request_success_total";
    let _ = writeln!(out, "# HELP {name} Count of successfully processed requests.\n# TYPE {name} counter");
    for (id, stats) in models {
        for o in [Outcome::Stop, Outcome::Length, Outcome::Abort] {
            let _ = writeln!(out, "{name}{{model_name=\"{}\",finished_reason=\"{}\"}} {}", label(id), o.as_str(), stats.latency.outcomes[o as usize]);
        }
    }
    let name = "inferd_requests_failed_total";
    let _ = writeln!(out, "# HELP {name} Requests that ended with an error event.\n# TYPE {name} counter");
    for (id, stats) in models {
        let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", label(id), stats.latency.outcomes[Outcome::Error as usize]);
    }
    for (i, (name, help, _)) in histograms(first).iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (id, stats) in models {
            let h = histograms(stats)[i].2;
            let id = label(id);
            for (b, c) in h.bounds.iter().zip(&h.cumulative) {
                let _ = writeln!(out, "{name}_bucket{{model_name=\"{id}\",le=\"{b}\"}} {c}");
            }
            let _ = writeln!(out, "{name}_bucket{{model_name=\"{id}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{model_name=\"{id}\"}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{model_name=\"{id}\"}} {}", h.count);
        }
    }
    out
}

/// `inferd_http_requests_total{route, status}`: responses so far (this one not yet counted).
pub fn render_status(counts: &[(&str, u16, u64)]) -> String {
    let name = "inferd_http_requests_total";
    let mut out = format!("# HELP {name} HTTP responses by route pattern and status code.\n# TYPE {name} counter\n");
    for (route, status, n) in counts {
        let _ = writeln!(out, "{name}{{route=\"{}\",status=\"{status}\"}} {n}", label(route));
    }
    out
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let models: Vec<(String, EngineStats)> = state.models().filter_map(|m| m.generator.stats().map(|s| (m.id.clone(), s))).collect();
    let mut text = render(&models);
    text.push_str(&render_status(&state.status_counts.snapshot()));
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_series_per_model_with_help_and_type() {
        let a = EngineStats { running: 2, waiting: 1, generated_tokens: 40, prompt_tokens: 12, steps: 21, step_seconds: 0.5, sample_seconds: 0.25, idle_seconds: 0.125, preemptions: 3, overlapped_tokens: 9, dropped_tokens: 1, kv_cache_usage: 0.25, prefix_cache_tokens: 7, prefix_cache_bytes: 4096, latency: Default::default() };
        let b = EngineStats::default();
        let text = render(&[("qwen".into(), a), ("we\"ird".into(), b)]);
        assert!(text.starts_with("# HELP inferd_requests_running "), "{text}");
        assert!(text.contains("# TYPE inferd_generation_tokens_total counter\ninferd_generation_tokens_total{model=\"qwen\"} 40\ninferd_generation_tokens_total{model=\"we\\\"ird\"} 0\n"), "{text}");
        assert!(text.contains("inferd_engine_step_seconds_total{model=\"qwen\"} 0.5\n"), "{text}");
        assert!(text.contains("inferd_requests_waiting{model=\"qwen\"} 1\n"), "{text}");
        assert!(text.contains("inferd_num_preemptions_total{model=\"qwen\"} 3\n") && text.contains("inferd_kv_cache_usage_perc{model=\"qwen\"} 0.25\n"), "{text}");
        assert!(text.contains("vllm:prefix_cache_hits_total{model_name=\"qwen\"} 7\n"), "{text}");
        assert!(text.contains("# TYPE inferd_prefix_cache_bytes gauge\ninferd_prefix_cache_bytes{model=\"qwen\"} 4096\n"), "{text}");
        assert!(text.contains("inferd_engine_idle_seconds_total{model=\"qwen\"} 0.125\n"), "{text}");
        assert!(text.contains("inferd_engine_overlapped_tokens_total{model=\"qwen\"} 9\n") && text.contains("inferd_engine_dropped_tokens_total{model=\"qwen\"} 1\n"), "{text}");
        assert_eq!(text.matches("# TYPE").count(), 14 + 7 + 2 + 4);
        assert_eq!(render(&[]), "");
    }
}
