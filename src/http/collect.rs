//! Non-streamed responses: gathers every choice's events into one `chat.completion` or
//! `text_completion` object. Pure, like `sse`.
use serde_json::Value;

use super::sse::{chat_logprob, finish_str, push_text_logprob, usage, Mode, ResponseMeta};
use super::types::{AssistantMessage, ChatChoice, ChatLogprobs, CompletionLogprobs, FunctionCall, TextChoice, ToolCallOut};
use crate::engine::{Event, FinishReason};
use crate::tools::ToolParsing;

#[derive(Debug, Clone, Default)]
struct Choice {
    text: String,
    chat_lp: ChatLogprobs,
    text_lp: CompletionLogprobs,
    finish: Option<FinishReason>,
    tokens: usize,
    cached: usize,
}

/// Accumulates the events of all choices of one request.
#[derive(Debug)]
pub struct Collector {
    mode: Mode,
    logprobs: bool,
    choices: Vec<Choice>,
    error: Option<String>,
    /// The request's tools: chat answers are split into content and tool calls.
    tools: Option<ToolParsing>,
}

impl Collector {
    /// `n` choices; `logprobs` whether the client asked for them.
    pub fn new(mode: Mode, n: usize, logprobs: bool) -> Self {
        Self { mode, logprobs, choices: vec![Choice::default(); n], error: None, tools: None }
    }

    /// Parses each chat choice's tool calls (`tools`: the request's, when it has any).
    pub fn with_tools(mut self, tools: Option<&ToolParsing>) -> Self {
        self.tools = tools.cloned();
        self
    }

    /// Feeds one event of choice `index`.
    pub fn push(&mut self, index: usize, event: Event) {
        let Some(c) = self.choices.get_mut(index) else { return };
        match event {
            Event::Token { text, logprob, .. } => {
                c.tokens += 1;
                if let Some(e) = logprob.filter(|_| self.logprobs) {
                    match self.mode {
                        Mode::Chat => c.chat_lp.content.push(chat_logprob(&e)),
                        Mode::Text => push_text_logprob(&mut c.text_lp, &e, c.text.chars().count()),
                    }
                }
                c.text.push_str(&text);
            }
            Event::Done { finish_reason, completion_tokens, cached_prompt_tokens, .. } => {
                c.finish = Some(finish_reason);
                c.tokens = c.tokens.max(completion_tokens);
                c.cached = cached_prompt_tokens;
            }
            Event::Error(message) => {
                self.error.get_or_insert(message);
            }
        }
    }

    /// The channel of choice `index` closed.
    pub fn closed(&mut self, index: usize) {
        if self.choices.get(index).is_some_and(|c| c.finish.is_none()) && self.error.is_none() {
            self.error = Some("generation ended unexpectedly: the model worker stopped".into());
        }
    }

    /// Whether an engine error ended the request (further events are pointless).
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// The finished response object, or the engine's error message.
    pub fn finish(self, meta: ResponseMeta, prompt_tokens: usize) -> Result<Value, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        // The prompt counts once; its cached part is the best any choice got.
        let cached = self.choices.iter().map(|c| c.cached).max().unwrap_or(0);
        let u = usage(prompt_tokens, completion, cached);
        let logprobs = self.logprobs;
        let tools = self.tools;
        let value = match self.mode {
            Mode::Chat => {
                let choices: Vec<ChatChoice> = self
                    .choices
                    .into_iter()
                    .enumerate()
                    .map(|(index, c)| {
                        let (content, calls) = match &tools {
                            Some(t) => {
                                let p = crate::tools::parse(t, &c.text);
                                (p.content, p.calls)
                            }
                            None => (Some(c.text), Vec::new()),
                        };
                        let tool_calls: Vec<ToolCallOut> = calls
                            .into_iter()
                            .map(|t| ToolCallOut { id: t.id, kind: "function", function: FunctionCall { name: t.name, arguments: t.arguments } })
                            .collect();
                        ChatChoice {
                            index,
                            finish_reason: c.finish.map(|r| finish_str(r, !tool_calls.is_empty())),
                            message: AssistantMessage { role: "assistant", content, refusal: None, tool_calls },
                            logprobs: logprobs.then_some(c.chat_lp),
                        }
                    })
                    .collect();
                serde_json::to_value(meta.envelope("chat.completion", choices, Some(Some(u))))
            }
            Mode::Text => {
                let choices: Vec<TextChoice> = self
                    .choices
                    .into_iter()
                    .enumerate()
                    .map(|(index, c)| TextChoice {
                        text: c.text,
                        index,
                        logprobs: logprobs.then_some(c.text_lp),
                        finish_reason: c.finish.map(FinishReason::as_str),
                    })
                    .collect();
                serde_json::to_value(meta.envelope("text_completion", choices, Some(Some(u))))
            }
        };
        value.map_err(|e| format!("could not serialise the response: {e}"))
    }
}
