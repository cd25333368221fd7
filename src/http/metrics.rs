//! `GET /metrics`: the engines' counters in Prometheus' text format (version 0.0.4), one series
//! per served model, like vLLM's `/metrics` (unauthenticated, outside `/v1`).
use std::fmt::Write;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

use super::AppState;
use crate::engine::EngineStats;

/// (name, type, help, value) of each series.
fn series(s: &EngineStats) -> [(&'static str, &'static str, &'static str, f64); 9] {
    [
        ("inferd_requests_running", "gauge", "Sequences in the running batch (prefilling or decoding).", s.running as f64),
        ("inferd_requests_waiting", "gauge", "Sequences submitted and not yet running.", s.waiting as f64),
        ("inferd_prompt_tokens_total", "counter", "Prompt tokens run through the model.", s.prompt_tokens as f64),
        ("inferd_generation_tokens_total", "counter", "Tokens sampled.", s.generated_tokens as f64),
        ("inferd_engine_steps_total", "counter", "Forward steps (one batched pass over all scheduled rows).", s.steps as f64),
        ("inferd_engine_step_seconds_total", "counter", "Seconds spent in forward steps.", s.step_seconds),
        ("inferd_engine_sampling_seconds_total", "counter", "Seconds spent sampling, matching stops and detokenising after steps.", s.sample_seconds),
        ("inferd_num_preemptions_total", "counter", "Sequences preempted because the KV cache was full (they run again later).", s.preemptions as f64),
        ("inferd_kv_cache_usage_perc", "gauge", "Fraction of the KV cache in use, 0 to 1 (0 when the cache is unbounded).", s.kv_cache_usage),
    ]
}

/// Renders the metrics of `models` (id and counters).
pub fn render(models: &[(String, EngineStats)]) -> String {
    let mut out = String::new();
    let Some((_, first)) = models.first() else { return out };
    for (i, (name, kind, help, _)) in series(first).iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, stats) in models {
            let value = series(stats)[i].3;
            let id = id.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            let _ = writeln!(out, "{name}{{model=\"{id}\"}} {value}");
        }
    }
    out
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let models: Vec<(String, EngineStats)> = state.models().filter_map(|m| m.generator.stats().map(|s| (m.id.clone(), s))).collect();
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render(&models))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_series_per_model_with_help_and_type() {
        let a = EngineStats { running: 2, waiting: 1, generated_tokens: 40, prompt_tokens: 12, steps: 21, step_seconds: 0.5, sample_seconds: 0.25, preemptions: 3, kv_cache_usage: 0.25 };
        let b = EngineStats::default();
        let text = render(&[("qwen".into(), a), ("we\"ird".into(), b)]);
        assert!(text.starts_with("# HELP inferd_requests_running "), "{text}");
        assert!(text.contains("# TYPE inferd_generation_tokens_total counter\ninferd_generation_tokens_total{model=\"qwen\"} 40\ninferd_generation_tokens_total{model=\"we\\\"ird\"} 0\n"), "{text}");
        assert!(text.contains("inferd_engine_step_seconds_total{model=\"qwen\"} 0.5\n"), "{text}");
        assert!(text.contains("inferd_requests_waiting{model=\"qwen\"} 1\n"), "{text}");
        assert!(text.contains("inferd_num_preemptions_total{model=\"qwen\"} 3\n") && text.contains("inferd_kv_cache_usage_perc{model=\"qwen\"} 0.25\n"), "{text}");
        assert_eq!(text.matches("# TYPE").count(), 9);
        assert_eq!(render(&[]), "");
    }
}
