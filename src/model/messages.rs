//! Preparing OpenAI chat messages for a chat template.
//!
//! Templates written for transformers expect `content` to be a string and a tool call's
//! `arguments` to be a mapping (Qwen2.5's template writes `arguments | tojson`). The OpenAI API
//! allows `content` as a list of parts and sends `arguments` as a JSON-encoded string, so the
//! messages are normalised here before rendering.
use serde_json::{Map, Value};

use super::template::TemplateError;

/// Returns `messages` with every list-of-parts `content` flattened to a string: the `text` of
/// each `{"type": "text", "text": ...}` part, joined with "\n" (as vLLM does for string-content
/// templates). String and null contents are kept as they are. Any other part type (images, audio)
/// is refused with `TemplateError::Render`, since these text models cannot take it.
pub fn flatten_content(messages: &Value) -> Result<Value, TemplateError> {
    map_messages(messages, |msg| {
        if let Some(Value::Array(parts)) = msg.get("content") {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(text)) => texts.push(text.to_string()),
                    (Some("text"), None) => {
                        return Err(TemplateError::Render("a text content part has no string 'text'".into()))
                    }
                    (Some(other), _) => {
                        return Err(TemplateError::Render(format!(
                            "content parts of type '{other}' are not supported by this model (text only)"
                        )))
                    }
                    (None, _) => return Err(TemplateError::Render("a content part has no 'type'".into())),
                }
            }
            msg.insert("content".into(), Value::String(texts.join("\n")));
        }
        Ok(())
    })
}

/// [`flatten_content`], and also decodes each assistant tool call's `function.arguments` from
/// its JSON string into the object templates expect (left as a string if it is not valid JSON).
pub fn normalize_messages(messages: &Value) -> Result<Value, TemplateError> {
    let flat = flatten_content(messages)?;
    map_messages(&flat, |msg| {
        if let Some(Value::Array(calls)) = msg.get_mut("tool_calls") {
            for call in calls {
                if let Some(function) = call.get_mut("function").and_then(Value::as_object_mut) {
                    if let Some(Value::String(args)) = function.get("arguments") {
                        if let Ok(parsed) = serde_json::from_str::<Value>(args) {
                            function.insert("arguments".into(), parsed);
                        }
                    }
                }
            }
        }
        Ok(())
    })
}

fn map_messages(
    messages: &Value,
    mut f: impl FnMut(&mut Map<String, Value>) -> Result<(), TemplateError>,
) -> Result<Value, TemplateError> {
    let list = messages
        .as_array()
        .ok_or_else(|| TemplateError::Render("'messages' must be an array".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for msg in list {
        let mut msg = msg.clone();
        let obj = msg
            .as_object_mut()
            .ok_or_else(|| TemplateError::Render("each message must be an object".into()))?;
        f(obj)?;
        out.push(msg);
    }
    Ok(Value::Array(out))
}
