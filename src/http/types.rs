//! OpenAI wire types. Requests keep every field optional (presence and ranges are checked in
//! `validate`, with precise messages) and ignore unknown fields, as OpenAI does. Responses and
//! chunks serialise to OpenAI's exact shapes.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Sampling and output fields shared by chat and text completions (OpenAI plus the usual vLLM /
/// llama.cpp extensions `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`).
#[derive(Debug, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<serde_json::Number>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub stop: Option<StopSpec>,
    pub max_tokens: Option<i64>,
    pub n: Option<i64>,
    pub ignore_eos: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Default, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    /// Kept as JSON: each message is checked field by field so errors can name `messages[i].x`.
    pub messages: Option<Vec<Value>>,
    /// Newer name for `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    /// With `tool_choice` "required": whether several calls may come (default true).
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<ResponseFormat>,
}

/// `POST /v1/completions` body.
#[derive(Debug, Default, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    pub prompt: Option<PromptInput>,
    /// Number of top alternatives per token, 0..=5.
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

/// `prompt` of a text completion.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `response_format`: `{"type": "text" | "json_object"}` or `{"type": "json_schema",
/// "json_schema": {"name", "schema", "strict", "description"}}` (kept as JSON, checked in
/// `structured`).
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<Value>,
}

/// Token counts of one request: the prompt counted once, completions summed over choices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's `usage.prompt_tokens_details`: prompt tokens served from the prefix cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

/// One alternative in a chat `top_logprobs` list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

/// One generated token in chat `logprobs.content`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// Chat `logprobs`: `{"content":[...],"refusal":null}`. OpenAI's `ChoiceLogprobs` requires both
/// keys; this server never refuses, so `refusal` is always null.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    pub refusal: Option<Vec<ChatTokenLogprob>>,
}

impl ChatLogprobs {
    /// Logprobs of these content tokens (no refusal).
    pub fn content(content: Vec<ChatTokenLogprob>) -> Self {
        Self { content, refusal: None }
    }
}

/// Text-completion `logprobs`: parallel arrays, one entry per generated token.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f64>,
    pub top_logprobs: Vec<serde_json::Map<String, Value>>,
    pub text_offset: Vec<usize>,
}

/// The assistant message of a non-streamed chat choice. `content` is null when the answer is
/// only tool calls; `tool_calls` is left out when there are none (OpenAI's shapes).
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: Option<String>,
    pub refusal: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// One tool call of an assistant message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

/// A call's function: its name and its arguments as a JSON string.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A piece of a tool call in a stream: the first piece of a call has its `id`, `type` and
/// `function.name` (with empty arguments), later pieces only `function.arguments`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// One choice of a non-streamed chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}


/// The `delta` of a chat chunk: role on the first chunk of a choice, then content or tool-call
/// pieces.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One choice inside a chat chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}


/// One choice of a text completion (whole or chunk).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextChoice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}


/// What every completion object shares, whole or streamed; only the choice type differs:
/// `chat.completion` (`ChatChoice`), `chat.completion.chunk` (`ChunkChoice`) and
/// `text_completion` (`TextChoice`, whole and as a stream chunk).
/// `usage` is omitted when `None` (stream chunks without `include_usage`, and every text chunk but
/// the usage chunk), `null` when `Some(None)` (every chat chunk but the last with
/// `include_usage`), and set on whole responses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Envelope<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
    /// For a LoRA adapter: the base model it runs on (vLLM's field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// For a LoRA adapter: the directory it was loaded from (vLLM's field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}
