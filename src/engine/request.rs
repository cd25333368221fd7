//! The checked request type the engine accepts, and the events it sends back.
use std::collections::HashMap;

/// Sampling settings, already range-checked by validation.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// In [0, 1]; 0 disables.
    pub min_p: f32,
    /// Per-sequence RNG seed; None draws one at admission.
    pub seed: Option<u64>,
    /// OpenAI presence penalty in [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in [-2, 2].
    pub frequency_penalty: f32,
    /// llama.cpp / vLLM style multiplicative penalty, > 0; 1 disables.
    pub repetition_penalty: f32,
    /// Token id -> bias added to its logit, each in [-100, 100].
    pub logit_bias: HashMap<u32, f32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: HashMap::new(),
        }
    }
}

/// One generation (one choice): what the engine schedules as a single sequence.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt_tokens: Vec<u32>,
    pub sampling: SamplingParams,
    /// Tokens to generate at most (already capped so prompt + max fits the context).
    pub max_new_tokens: usize,
    /// Stop strings: generation ends before the first occurrence, which is never emitted.
    pub stop: Vec<String>,
    /// Some(k): report the chosen token's logprob and the k most likely alternatives (k may be 0).
    pub logprobs: Option<usize>,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// The LoRA adapter version this request was admitted with (None = the base model). Holding
    /// the `Arc` keeps that version alive for the request's whole life, whatever reloads happen.
    pub adapter: Option<std::sync::Arc<crate::lora::LoraAdapter>>,
    /// Structured outputs: the grammar every sampled token must keep to (this choice's own).
    pub constraint: Option<crate::structured::Constraint>,
}

/// Log-probability of one token, with its text as bytes may be partial UTF-8.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// Logprob details for one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct LogprobEntry {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS token or a stop string.
    Stop,
    /// max_new_tokens or the context length reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What flows back to the HTTP layer for one sequence, in order: zero or more `Token`s, then one
/// `Done` or one `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly released text (valid UTF-8, possibly empty while a stop string or a partial character
    /// is held back) for one generated token.
    Token { text: String, token_id: u32, logprob: Option<LogprobEntry> },
    /// `cached_prompt_tokens`: prompt tokens whose keys and values came from the prefix cache
    /// instead of being computed (`usage.prompt_tokens_details.cached_tokens`).
    Done { finish_reason: FinishReason, prompt_tokens: usize, completion_tokens: usize, cached_prompt_tokens: usize },
    Error(String),
}
