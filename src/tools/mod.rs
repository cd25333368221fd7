//! Tool calling: turning a model's tool-call text into OpenAI's `tool_calls`.
//!
//! The format is the model's own, derived from its chat template ([`ToolFormat::detect`]) or set
//! per model (`[[models]] tool_call_parser`):
//! - [`ToolFormat::Hermes`]: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
//!   one block per call (Qwen2.5, Qwen3, Hermes, SmolLM3 and most ChatML tool templates);
//! - [`ToolFormat::Llama3Json`]: the whole answer is `{"name": ..., "parameters": {...}}` (or
//!   `"arguments"`), optionally after `<|python_tag|>`, several separated by `;` (Llama 3.1-3.3);
//! - [`ToolFormat::Mistral`]: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (the
//!   marker may be hidden as a special token).
//!
//! A block becomes a call only when it is well-formed JSON naming one of the request's tools;
//! anything else (text that only looks like a call, broken JSON, an unknown name) stays content,
//! byte for byte. Whole answers ([`parse`]) run the streaming parser ([`stream::ToolStream`]) in
//! one piece, so both find the same calls and the same content (a whole answer's content is
//! trimmed at its end, and is null when only whitespace surrounds its calls).
pub mod stream;
#[cfg(test)]
mod tests;

use serde::Deserialize;
use serde_json::value::RawValue;

/// How a model writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3Json,
    Mistral,
}

impl ToolFormat {
    /// The setting's names: `hermes`, `llama3_json`, `mistral`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" | "qwen" | "qwen2_5" => Some(Self::Hermes),
            "llama3_json" | "llama3" => Some(Self::Llama3Json),
            "mistral" => Some(Self::Mistral),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3_json",
            Self::Mistral => "mistral",
        }
    }

    /// The format a chat template teaches its model: the markers its tool section writes.
    /// Templates with none of them (plain ChatML) get Hermes, the most common convention.
    pub fn detect(template: &str) -> Self {
        if template.contains("<tool_call>") {
            Self::Hermes
        } else if template.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if template.contains("<|python_tag|>") || (template.contains("<|start_header_id|>") && template.contains("\"parameters\"")) {
            Self::Llama3Json
        } else {
            Self::Hermes
        }
    }
}

/// What the response parser needs of a request's tools.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolParsing {
    pub format: ToolFormat,
    /// The functions the request declared; a call must name one of them.
    pub names: Vec<String>,
}

/// One parsed call. `arguments` is the model's JSON text of the arguments, as written.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// A whole answer split into content and calls.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// The text outside the calls; None when that is only whitespace and there are calls.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

/// A fresh call id in OpenAI's style: `call_` and 24 random letters and digits.
pub fn new_call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

/// The name and raw arguments of one call object, if it is one of `names`. Arguments must be a
/// JSON object (or null/absent: `{}`); a string holding a JSON object is taken as that object's
/// text, as some models write it.
pub(crate) fn call_of(obj: &str, names: &[String], args_key: &[&str]) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct Call<'a> {
        name: String,
        #[serde(borrow, default)]
        arguments: Option<&'a RawValue>,
        #[serde(borrow, default)]
        parameters: Option<&'a RawValue>,
    }
    let c: Call<'_> = serde_json::from_str(obj.trim()).ok()?;
    if !names.iter().any(|n| *n == c.name) {
        return None;
    }
    let raw = args_key.iter().find_map(|k| match *k {
        "arguments" => c.arguments,
        _ => c.parameters,
    });
    let text = match raw.map(RawValue::get) {
        None | Some("null") => "{}".to_string(),
        Some(t) if t.starts_with('{') => t.to_string(),
        Some(t) if t.starts_with('"') => {
            let inner: String = serde_json::from_str(t).ok()?;
            let v: serde_json::Value = serde_json::from_str(&inner).ok()?;
            if !v.is_object() {
                return None;
            }
            inner
        }
        Some(_) => return None,
    };
    Some((c.name, text))
}

/// Splits a whole answer: the same result as feeding it to a [`stream::ToolStream`] in one piece.
pub fn parse(spec: &ToolParsing, text: &str) -> Parsed {
    let mut s = stream::ToolStream::new(spec.clone());
    let mut out = s.push(text);
    out.extend(s.finish());
    let mut content = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    for piece in out {
        match piece {
            stream::Out::Content(t) => content.push_str(&t),
            stream::Out::CallStart { id, name, .. } => calls.push(ToolCall { id, name, arguments: String::new() }),
            stream::Out::CallArguments { index, text } => {
                if let Some(c) = calls.get_mut(index) {
                    c.arguments.push_str(&text);
                }
            }
        }
    }
    let content = match calls.is_empty() {
        true => Some(content),
        false if content.trim().is_empty() => None,
        false => Some(content.trim_end().to_string()),
    };
    Parsed { content, calls }
}
