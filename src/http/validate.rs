//! Turns an OpenAI request into checked `GenRequest`s (one per choice), with OpenAI-style messages
//! naming the offending parameter. Everything a client controls is range-checked here, so nothing
//! after this point can fail on client input.

use super::error::ApiError;
use super::state::ModelEntry;
use super::messages::{chat_messages, request_tools};
use super::types::{ChatCompletionRequest, CommonParams, CompletionRequest, PromptInput, StopSpec};
use crate::engine::{GenRequest, SamplingParams};

/// A client mistake: 400 with `param` naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ValidationError {
    /// A 400 naming `param`.
    pub fn new(message: impl Into<String>, param: &str) -> Self {
        Self { message: message.into(), param: Some(param.to_string()), code: None }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let err = ApiError::invalid(e.message, e.param.as_deref());
        match e.code {
            Some(code) => err.with_code(code),
            None => err,
        }
    }
}

type VResult<T> = Result<T, ValidationError>;

/// A request ready for the engine.
#[derive(Debug, Clone)]
pub struct Validated {
    /// One sequence per choice, index = choice index.
    pub requests: Vec<GenRequest>,
    pub prompt_tokens: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Some(k) when logprobs were asked, with k alternatives per token.
    pub logprobs: Option<usize>,
    /// How to find tool calls in the answers (chat requests with tools, unless `tool_choice`
    /// is "none" or the model's `tool_call_parser` is "none").
    pub tools: Option<crate::tools::ToolParsing>,
}

impl Validated {
    /// Every choice runs with this adapter version (None: the base model).
    pub fn with_adapter(mut self, adapter: Option<std::sync::Arc<crate::lora::LoraAdapter>>) -> Self {
        for r in &mut self.requests {
            r.adapter = adapter.clone();
        }
        self
    }
}

/// Whether a prompt came from chat messages or a raw completion prompt (wording of errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PromptKind {
    Chat,
    Text,
}

/// Checks `model` is present; the caller looks it up (404 when unknown).
pub fn require_model(common: &CommonParams) -> VResult<&str> {
    match common.model.as_deref() {
        Some(m) if !m.is_empty() => Ok(m),
        _ => Err(ValidationError::new("you must provide a model parameter", "model")),
    }
}

/// Validates a chat request against `model`, rendering and tokenising its messages.
pub fn validate_chat(req: &ChatCompletionRequest, model: &ModelEntry, max_n: usize) -> VResult<Validated> {
    let c = &req.common;
    let Some(template) = &model.chat_template else {
        let msg = format!("The model `{}` has no chat template; use /v1/completions instead.", model.id);
        return Err(ValidationError::new(msg, "model"));
    };
    let messages = match &req.messages {
        Some(m) if !m.is_empty() => chat_messages(m)?,
        Some(_) => return Err(ValidationError::new("'messages' must contain at least one message.", "messages")),
        None => return Err(ValidationError::new("Missing required parameter: 'messages'.", "messages")),
    };
    let tools = request_tools(req)?;
    let grammar = super::structured::grammar_of(req.response_format.as_ref(), tools.as_ref(), req.parallel_tool_calls, model)?;
    let top = int_in(req.top_logprobs, "top_logprobs", 0, 20)?;
    let logprobs = match (req.logprobs.unwrap_or(false), top) {
        (true, t) => Some(t.unwrap_or(0) as usize),
        (false, Some(t)) if t > 0 => {
            return Err(ValidationError::new("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs"))
        }
        (false, _) => None,
    };
    let text = template
        .render(&messages, tools.as_ref().map(|t| &t.json), true)
        .map_err(|e| ValidationError::new(format!("Could not apply the chat template: {e}"), "messages"))?;
    let prompt = encode(model, &text, false, "messages")?;
    let max = req.max_completion_tokens.or(c.max_tokens);
    let param = if req.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
    let mut v = build(c, model, prompt, max, param, logprobs, max_n, PromptKind::Chat)?;
    if let Some((g, param)) = grammar {
        super::structured::constrain(&mut v, model, g, param)?;
    }
    v.tools = tools.zip(model.tool_format).map(|(t, format)| crate::tools::ToolParsing { format, names: t.names });
    Ok(v)
}

/// Validates a text completion request against `model`, tokenising its prompt.
pub fn validate_completion(req: &CompletionRequest, model: &ModelEntry, max_n: usize) -> VResult<Validated> {
    let c = &req.common;
    if req.echo == Some(true) {
        return Err(ValidationError::new("'echo' is not supported by this server.", "echo"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ValidationError::new("'suffix' is not supported by this server.", "suffix"));
    }
    if let Some(b) = req.best_of {
        let n = c.n.unwrap_or(1);
        if b != 1 && b != n {
            return Err(ValidationError::new("'best_of' is not supported; it must equal 'n'.", "best_of"));
        }
    }
    let logprobs = int_in(req.logprobs, "logprobs", 0, 5)?.map(|k| k as usize);
    let prompt = match &req.prompt {
        None => return Err(ValidationError::new("Missing required parameter: 'prompt'.", "prompt")),
        Some(PromptInput::Text(s)) => encode(model, s, true, "prompt")?,
        Some(PromptInput::Texts(v)) if v.len() == 1 => encode(model, &v[0], true, "prompt")?,
        Some(PromptInput::Tokens(ids)) => token_ids(ids, model, "prompt")?,
        Some(PromptInput::TokenLists(v)) if v.len() == 1 => token_ids(&v[0], model, "prompt")?,
        Some(_) => {
            return Err(ValidationError::new(
                "Batched prompts are not supported: send one prompt per request (use 'n' for several choices).",
                "prompt",
            ))
        }
    };
    build(c, model, prompt, c.max_tokens, "max_tokens", logprobs, max_n, PromptKind::Text)
}

#[allow(clippy::too_many_arguments)]
fn build(
    c: &CommonParams,
    model: &ModelEntry,
    prompt: Vec<u32>,
    max_tokens: Option<i64>,
    max_param: &str,
    logprobs: Option<usize>,
    max_n: usize,
    kind: PromptKind,
) -> VResult<Validated> {
    let n = int_in(c.n, "n", 1, max_n as i64)?.unwrap_or(1) as usize;
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ValidationError::new(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        ));
    }
    let include_usage = c.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    let sampling = sampling(c, model.vocab_limit())?;
    let stop = stops(c.stop.as_ref())?;
    let max_new_tokens = budget(prompt.len(), max_tokens, max_param, model.generator.max_context(), kind)?;
    let requests = (0..n)
        .map(|i| {
            let mut s = sampling.clone();
            s.seed = sampling.seed.map(|seed| seed.wrapping_add(i as u64));
            GenRequest {
                prompt_tokens: prompt.clone(),
                sampling: s,
                max_new_tokens,
                stop: stop.clone(),
                logprobs,
                ignore_eos: c.ignore_eos.unwrap_or(false),
                adapter: None,
                constraint: None,
            }
        })
        .collect();
    Ok(Validated { requests, prompt_tokens: prompt.len(), stream, include_usage, logprobs, tools: None })
}

/// Completion budget: the requested `max_tokens`, or what is left of the context.
fn budget(prompt: usize, requested: Option<i64>, param: &str, ctx: usize, kind: PromptKind) -> VResult<usize> {
    let (what, reduce) = match kind {
        PromptKind::Chat => ("messages", "messages"),
        PromptKind::Text => ("prompt", "prompt"),
    };
    if prompt == 0 {
        return Err(ValidationError::new("The prompt must contain at least one token.", what));
    }
    let too_long = |msg: String| ValidationError { message: msg, param: Some(what.into()), code: Some("context_length_exceeded") };
    if prompt >= ctx {
        return Err(too_long(format!(
            "This model's maximum context length is {ctx} tokens. However, your {what} resulted in {prompt} tokens. \
             Please reduce the length of the {reduce}."
        )));
    }
    let Some(m) = requested else { return Ok(ctx - prompt) };
    if m < 1 {
        return Err(ValidationError::new(
            format!("Invalid '{param}': integer below minimum value. Expected a value >= 1, but got {m} instead."),
            param,
        ));
    }
    let total = (prompt as i128) + (m as i128);
    if total > ctx as i128 {
        let detail = match kind {
            PromptKind::Chat => format!("{prompt} in the messages, {m} in the completion"),
            PromptKind::Text => format!("{prompt} in your prompt; {m} for the completion"),
        };
        return Err(too_long(format!(
            "This model's maximum context length is {ctx} tokens. However, you requested {total} tokens ({detail}). \
             Please reduce the length of the {reduce} or completion."
        )));
    }
    Ok(m as usize)
}

/// Range-checks the sampling fields.
fn sampling(c: &CommonParams, vocab: usize) -> VResult<SamplingParams> {
    let d = SamplingParams::default();
    let top_k = int_in(c.top_k, "top_k", -1, i64::MAX)?.unwrap_or(0);
    let seed = match &c.seed {
        None => None,
        Some(num) => Some(match (num.as_u64(), num.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => return Err(ValidationError::new(format!("Invalid 'seed': expected an integer, got {num}."), "seed")),
        }),
    };
    let mut logit_bias = std::collections::HashMap::new();
    for (k, v) in c.logit_bias.iter().flatten() {
        let id = k.trim().parse::<u32>().ok().filter(|&id| (id as usize) < vocab).ok_or_else(|| {
            ValidationError::new(
                format!("Invalid key in 'logit_bias': '{k}' is not a token id of this model (vocabulary size {vocab})."),
                "logit_bias",
            )
        })?;
        logit_bias.insert(id, float_in(Some(*v), "logit_bias", -100.0, 100.0, true)?.unwrap_or(0.0));
    }
    Ok(SamplingParams {
        temperature: float_in(c.temperature, "temperature", 0.0, 2.0, true)?.unwrap_or(d.temperature),
        top_p: float_in(c.top_p, "top_p", 0.0, 1.0, false)?.unwrap_or(d.top_p),
        top_k: if top_k <= 0 { 0 } else { (top_k as usize).min(vocab) },
        min_p: float_in(c.min_p, "min_p", 0.0, 1.0, true)?.unwrap_or(d.min_p),
        seed,
        presence_penalty: float_in(c.presence_penalty, "presence_penalty", -2.0, 2.0, true)?.unwrap_or(0.0),
        frequency_penalty: float_in(c.frequency_penalty, "frequency_penalty", -2.0, 2.0, true)?.unwrap_or(0.0),
        repetition_penalty: match c.repetition_penalty {
            Some(r) if !(r > 0.0 && r.is_finite()) => {
                return Err(ValidationError::new(
                    format!("Invalid 'repetition_penalty': expected a value > 0, but got {r} instead."),
                    "repetition_penalty",
                ))
            }
            Some(r) => r as f32,
            None => d.repetition_penalty,
        },
        logit_bias,
    })
}

/// A float within [lo, hi] (or (lo, hi] when `lo_inclusive` is false).
fn float_in(v: Option<f64>, name: &str, lo: f64, hi: f64, lo_inclusive: bool) -> VResult<Option<f32>> {
    let Some(x) = v else { return Ok(None) };
    let low_ok = if lo_inclusive { x >= lo } else { x > lo };
    if !(low_ok && x <= hi) {
        let open = if lo_inclusive { '[' } else { '(' };
        return Err(ValidationError::new(
            format!("Invalid '{name}': expected a value in {open}{lo}, {hi}], but got {x} instead."),
            name,
        ));
    }
    Ok(Some(x as f32))
}

/// An integer within [lo, hi].
fn int_in(v: Option<i64>, name: &str, lo: i64, hi: i64) -> VResult<Option<i64>> {
    match v {
        Some(x) if x < lo => Err(ValidationError::new(
            format!("Invalid '{name}': integer below minimum value. Expected a value >= {lo}, but got {x} instead."),
            name,
        )),
        Some(x) if x > hi => Err(ValidationError::new(
            format!("Invalid '{name}': integer above maximum value. Expected a value <= {hi}, but got {x} instead."),
            name,
        )),
        v => Ok(v),
    }
}

/// `stop`: up to 4 non-empty strings.
fn stops(stop: Option<&StopSpec>) -> VResult<Vec<String>> {
    let list = match stop {
        None => return Ok(Vec::new()),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if list.len() > 4 {
        return Err(ValidationError::new(
            format!("Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length {} instead.", list.len()),
            "stop",
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ValidationError::new("Invalid 'stop': stop sequences must not be empty strings.", "stop"));
    }
    Ok(list)
}

/// Tokenises text (`special`: let the tokenizer add BOS and the like).
pub(crate) fn encode(model: &ModelEntry, text: &str, special: bool, param: &str) -> VResult<Vec<u32>> {
    let enc = model
        .tokenizer
        .encode(text, special)
        .map_err(|e| ValidationError::new(format!("Could not tokenize the input: {e}"), param))?;
    Ok(enc.get_ids().to_vec())
}

/// Token ids a client sent (`param` names the field): every id must be in the vocabulary.
pub(crate) fn token_ids(ids: &[i64], model: &ModelEntry, param: &str) -> VResult<Vec<u32>> {
    let vocab = model.vocab_limit();
    ids.iter()
        .map(|&id| {
            u32::try_from(id).ok().filter(|&t| (t as usize) < vocab).ok_or_else(|| {
                ValidationError::new(format!("Invalid token id {id} in '{param}' (vocabulary size {vocab})."), param)
            })
        })
        .collect()
}
