//! Streaming chunk assembly as a pure state machine: engine events of each choice in, OpenAI
//! `data:` payloads out. No I/O, so every shape is unit-tested without a server.
//!
//! Per choice (chat): a role chunk `{"role":"assistant","content":""}`, content chunks, then a chunk
//! with an empty delta and `finish_reason`. Text completions have no role chunk. When every choice
//! has finished: a usage chunk with `choices: []` (if `include_usage`), then `[DONE]`. An engine
//! error ends the stream with an OpenAI error object, then `[DONE]`.
use serde::Serialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::types::{
    ChatLogprobs, ChatTokenLogprob, ChunkChoice, CompletionLogprobs, Delta, Envelope, FunctionDelta, TextChoice, ToolCallDelta,
    TopLogprob, Usage,
};
use crate::engine::{Event, FinishReason, LogprobEntry, TokenLogprob};
use crate::tools::stream::{Out, ToolStream};
use crate::tools::ToolParsing;

/// Chat or text completion: decides object names and chunk shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Chat,
    Text,
}

/// The fields every response object of one request shares.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
}

impl ResponseMeta {
    /// A response object (whole or chunk) of this request with the given choices.
    pub fn envelope<C>(&self, object: &'static str, choices: Vec<C>, usage: Option<Option<Usage>>) -> Envelope<C> {
        Envelope {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.system_fingerprint.clone(),
            choices,
            usage,
        }
    }
}

/// One thing to send: a JSON `data:` payload, or the final `data: [DONE]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Data(Value),
    Done,
}

#[derive(Debug, Default)]
struct ChoiceState {
    started: bool,
    finished: bool,
    /// Characters of completion text emitted so far (text-completion `text_offset`).
    chars: usize,
    /// Prompt tokens served from the prefix cache.
    cached: usize,
    tokens: usize,
    /// The tool-call parser, when the request has tools.
    tools: Option<ToolStream>,
}

/// The streaming state machine of one request.
#[derive(Debug)]
pub struct StreamAssembler {
    meta: ResponseMeta,
    mode: Mode,
    include_usage: bool,
    logprobs: bool,
    prompt_tokens: usize,
    choices: Vec<ChoiceState>,
    ended: bool,
}

impl StreamAssembler {
    /// `n` choices; `logprobs` whether the client asked for them.
    pub fn new(meta: ResponseMeta, mode: Mode, n: usize, prompt_tokens: usize, include_usage: bool, logprobs: bool) -> Self {
        let choices = (0..n).map(|_| ChoiceState::default()).collect();
        Self { meta, mode, include_usage, logprobs, prompt_tokens, choices, ended: false }
    }

    /// Parses each chat choice's tool calls (`tools`: the request's, when it has any).
    pub fn with_tools(mut self, tools: Option<&ToolParsing>) -> Self {
        if let Some(t) = tools.filter(|_| self.mode == Mode::Chat) {
            for c in &mut self.choices {
                c.tools = Some(ToolStream::new(t.clone()));
            }
        }
        self
    }

    /// True once `[DONE]` has been produced.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Feeds one event of choice `index`; returns the frames to send, in order.
    pub fn push(&mut self, index: usize, event: Event) -> Vec<Frame> {
        if self.ended || index >= self.choices.len() || self.choices[index].finished {
            return Vec::new();
        }
        if let Event::Error(message) = &event {
            return self.error(message);
        }
        let mut out = Vec::new();
        if !self.choices[index].started {
            self.choices[index].started = true;
            if self.mode == Mode::Chat {
                let delta = Delta { role: Some("assistant"), content: Some(String::new()), tool_calls: None };
                out.push(self.chat_chunk(index, delta, None, None));
            }
        }
        match event {
            Event::Token { text, logprob, .. } => {
                self.choices[index].tokens += 1;
                let lp = logprob.filter(|_| self.logprobs);
                if text.is_empty() && lp.is_none() {
                    return out;
                }
                out.push(match self.mode {
                    Mode::Chat if self.choices[index].tools.is_some() => {
                        let lps = lp.map(|e| ChatLogprobs::content(vec![chat_logprob(&e)]));
                        let pieces = self.choices[index].tools.as_mut().map(|t| t.push(&text)).unwrap_or_default();
                        out.extend(self.tool_chunks(index, pieces, lps));
                        return out;
                    }
                    Mode::Chat => {
                        let lps = lp.map(|e| ChatLogprobs::content(vec![chat_logprob(&e)]));
                        self.chat_chunk(index, Delta { role: None, content: Some(text), tool_calls: None }, lps, None)
                    }
                    Mode::Text => {
                        let offset = self.choices[index].chars;
                        self.choices[index].chars += text.chars().count();
                        let lps = lp.map(|e| {
                            let mut l = CompletionLogprobs::default();
                            push_text_logprob(&mut l, &e, offset);
                            l
                        });
                        self.text_chunk(index, text, lps, None)
                    }
                });
            }
            Event::Done { finish_reason, completion_tokens, cached_prompt_tokens, .. } => {
                let held = self.choices[index].tools.as_mut().map(ToolStream::finish).unwrap_or_default();
                out.extend(self.tool_chunks(index, held, None));
                let c = &mut self.choices[index];
                c.finished = true;
                c.tokens = c.tokens.max(completion_tokens);
                c.cached = cached_prompt_tokens;
                let called = c.tools.as_ref().is_some_and(|t| t.calls() > 0);
                let reason = Some(finish_str(finish_reason, called));
                out.push(match self.mode {
                    Mode::Chat => self.chat_chunk(index, Delta::default(), None, reason),
                    Mode::Text => self.text_chunk(index, String::new(), None, reason),
                });
                if self.choices.iter().all(|c| c.finished) {
                    if self.include_usage {
                        out.push(self.usage_chunk());
                    }
                    out.push(Frame::Done);
                    self.ended = true;
                }
            }
            Event::Error(_) => {}
        }
        out
    }

    /// The channel of choice `index` closed; an unfinished choice means the worker went away.
    pub fn closed(&mut self, index: usize) -> Vec<Frame> {
        match self.choices.get(index) {
            Some(c) if !c.finished && !self.ended => self.error("generation ended unexpectedly: the model worker stopped"),
            _ => Vec::new(),
        }
    }

    /// Ends the stream with an OpenAI-shaped error event, then `[DONE]`.
    pub fn error(&mut self, message: &str) -> Vec<Frame> {
        if self.ended {
            return Vec::new();
        }
        self.ended = true;
        vec![Frame::Data(ApiError::internal(message).body()), Frame::Done]
    }

    /// Token counts so far.
    pub fn usage(&self) -> Usage {
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        let cached = self.choices.iter().map(|c| c.cached).max().unwrap_or(0);
        usage(self.prompt_tokens, completion, cached)
    }

    /// Chat chunks: `usage: null` with `include_usage` (OpenAI's chunk schema has it nullable).
    fn usage_field(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }

    /// Chunks for what the tool parser let out for one token: content runs and call pieces, the
    /// token's logprobs on the first (on an empty content chunk when the parser held it all).
    fn tool_chunks(&self, index: usize, pieces: Vec<Out>, mut logprobs: Option<ChatLogprobs>) -> Vec<Frame> {
        let mut frames = Vec::new();
        for p in pieces {
            let delta = match p {
                Out::Content(text) => Delta { role: None, content: Some(text), tool_calls: None },
                Out::CallStart { index: i, id, name } => Delta {
                    role: None,
                    content: None,
                    tool_calls: Some(vec![ToolCallDelta {
                        index: i,
                        id: Some(id),
                        kind: Some("function"),
                        function: FunctionDelta { name: Some(name), arguments: String::new() },
                    }]),
                },
                Out::CallArguments { index: i, text } => Delta {
                    role: None,
                    content: None,
                    tool_calls: Some(vec![ToolCallDelta { index: i, id: None, kind: None, function: FunctionDelta { name: None, arguments: text } }]),
                },
            };
            frames.push(self.chat_chunk(index, delta, logprobs.take(), None));
        }
        if let Some(lps) = logprobs {
            frames.push(self.chat_chunk(index, Delta { role: None, content: Some(String::new()), tool_calls: None }, Some(lps), None));
        }
        frames
    }

    fn chat_chunk(&self, index: usize, delta: Delta, logprobs: Option<ChatLogprobs>, finish: Option<&'static str>) -> Frame {
        let choice = ChunkChoice { index, delta, logprobs, finish_reason: finish };
        self.frame("chat.completion.chunk", vec![choice], self.usage_field())
    }

    /// Text chunks never carry `usage: null`: OpenAI's `CreateCompletionResponse` (which streamed
    /// text chunks share) has a non-nullable `usage`, so it is left out until the usage chunk.
    fn text_chunk(&self, index: usize, text: String, logprobs: Option<CompletionLogprobs>, finish: Option<&'static str>) -> Frame {
        let choice = TextChoice { text, index, logprobs, finish_reason: finish };
        self.frame("text_completion", vec![choice], None)
    }

    fn frame<C: Serialize>(&self, object: &'static str, choices: Vec<C>, usage: Option<Option<Usage>>) -> Frame {
        Frame::Data(serde_json::to_value(self.meta.envelope(object, choices, usage)).unwrap_or(Value::Null))
    }

    fn usage_chunk(&self) -> Frame {
        let u = Some(Some(self.usage()));
        match self.mode {
            Mode::Chat => self.frame::<ChunkChoice>("chat.completion.chunk", Vec::new(), u),
            Mode::Text => self.frame::<TextChoice>("text_completion", Vec::new(), u),
        }
    }
}

/// A choice's `finish_reason`: `tool_calls` when it stopped by itself after calling tools.
pub fn finish_str(reason: FinishReason, called_tools: bool) -> &'static str {
    match reason {
        FinishReason::Stop if called_tools => "tool_calls",
        r => r.as_str(),
    }
}

/// `usage` with the total filled in; `cached`: prompt tokens served from the prefix cache.
pub fn usage(prompt_tokens: usize, completion_tokens: usize, cached: usize) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: super::types::PromptTokensDetails { cached_tokens: cached },
    }
}

/// A logprob for JSON: the shortest decimal of the f32 (so -0.1f32 prints as -0.1, not
/// -0.10000000149011612), and -9999 for values JSON cannot carry (-inf for masked tokens), as
/// OpenAI does.
fn finite(lp: f32) -> f64 {
    if lp.is_finite() {
        lp.to_string().parse().unwrap_or(lp as f64)
    } else {
        -9999.0
    }
}

fn top(t: &TokenLogprob) -> TopLogprob {
    TopLogprob { token: t.token.clone(), logprob: finite(t.logprob), bytes: t.bytes.clone() }
}

/// One chat `logprobs.content` entry.
pub fn chat_logprob(e: &LogprobEntry) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: e.chosen.token.clone(),
        logprob: finite(e.chosen.logprob),
        bytes: e.chosen.bytes.clone(),
        top_logprobs: e.top.iter().map(top).collect(),
    }
}

/// A token's name in text-completion logprobs. Tokens that are not whole UTF-8 (a byte of a
/// multi-byte character) are written `bytes:\xNN..` as OpenAI does: their text would be "\u{FFFD}"
/// for many different tokens, which would collide as keys of `top_logprobs`.
pub fn legacy_token_name(t: &TokenLogprob) -> String {
    if t.bytes.is_empty() || std::str::from_utf8(&t.bytes).is_ok() {
        return t.token.clone();
    }
    let mut name = String::from("bytes:");
    for b in &t.bytes {
        name.push_str(&format!("\\x{b:02x}"));
    }
    name
}

/// Appends one token to text-completion logprobs, at character `offset` of the completion.
pub fn push_text_logprob(l: &mut CompletionLogprobs, e: &LogprobEntry, offset: usize) {
    l.tokens.push(legacy_token_name(&e.chosen));
    l.token_logprobs.push(finite(e.chosen.logprob));
    let mut alts = serde_json::Map::new();
    // Best first: if two alternatives still share a name, the more likely one is kept.
    for t in &e.top {
        alts.entry(legacy_token_name(t)).or_insert_with(|| json!(finite(t.logprob)));
    }
    l.top_logprobs.push(alts);
    l.text_offset.push(offset);
}
