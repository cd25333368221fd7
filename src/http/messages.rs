//! Chat messages checked field by field (errors name `messages[i].field`) and normalised for
//! chat templates: content parts joined, `developer` shown as `system`, tool-call arguments decoded.
use serde_json::{json, Value};

use super::types::ChatCompletionRequest;
use super::validate::ValidationError;

type VResult<T> = Result<T, ValidationError>;

/// A request's tools as the template and the response parser see them.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestTools {
    /// The `tools` array for the template.
    pub json: Value,
    /// The functions a call may name: every tool's, or only the one `tool_choice` names.
    pub names: Vec<String>,
    /// `tool_choice`: "auto", "required", or a function's name.
    pub choice: ToolChoice,
}

/// What `tool_choice` asks.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    Required,
    Function(String),
}

/// The request's tools, checked: None when there are none or `tool_choice` is "none". Each tool
/// is `{"type": "function", "function": {"name": ..., ...}}`; a named `tool_choice` must name one.
pub fn request_tools(req: &ChatCompletionRequest) -> VResult<Option<RequestTools>> {
    let Some(tools) = &req.tools else {
        return match &req.tool_choice {
            Some(Value::Object(_)) => Err(ValidationError::new("'tool_choice' names a function but 'tools' is missing.", "tool_choice")),
            _ => Ok(None),
        };
    };
    let mut names = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let at = format!("tools[{i}]");
        if !t.is_object() {
            return Err(ValidationError::new("Each tool must be an object.", &at));
        }
        if let Some(kind) = t.get("type").filter(|k| k.as_str() != Some("function")) {
            return Err(ValidationError::new(format!("Invalid value: {kind}. Supported tool types are: 'function'."), &format!("{at}.type")));
        }
        match t.get("function").and_then(|f| f.get("name")) {
            Some(Value::String(n)) if !n.is_empty() => names.push(n.clone()),
            _ => return Err(ValidationError::new(format!("Missing required parameter: '{at}.function.name'."), &format!("{at}.function.name"))),
        }
    }
    let choice = match &req.tool_choice {
        None => ToolChoice::Auto,
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required,
        Some(Value::String(s)) => {
            return Err(ValidationError::new(
                format!("Invalid value: '{s}'. Supported values are: 'none', 'auto' and 'required'."),
                "tool_choice",
            ))
        }
        Some(Value::Object(o)) => match o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) if names.iter().any(|n| n == name) => ToolChoice::Function(name.to_string()),
            Some(name) => {
                return Err(ValidationError::new(format!("Invalid 'tool_choice': no function named '{name}' in 'tools'."), "tool_choice.function.name"))
            }
            None => return Err(ValidationError::new("Missing required parameter: 'tool_choice.function.name'.", "tool_choice.function.name")),
        },
        Some(_) => return Err(ValidationError::new("Invalid type for 'tool_choice': expected a string or an object.", "tool_choice")),
    };
    if tools.is_empty() {
        return match choice {
            ToolChoice::Auto => Ok(None),
            _ => Err(ValidationError::new("'tool_choice' needs at least one tool in 'tools'.", "tool_choice")),
        };
    }
    if let ToolChoice::Function(name) = &choice {
        names = vec![name.clone()];
    }
    Ok(Some(RequestTools { json: Value::Array(tools.clone()), names, choice }))
}

/// Checks each message and normalises it for chat templates (content parts joined into one string,
/// `developer` shown to the template as `system`).
pub fn chat_messages(messages: &[Value]) -> VResult<Value> {
    const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].{field}");
        let Some(obj) = m.as_object() else {
            return Err(ValidationError::new(format!("Invalid type for 'messages[{i}]': expected an object."), &format!("messages[{i}]")));
        };
        let role = match obj.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.as_str(),
            Some(Value::String(r)) => {
                return Err(ValidationError::new(
                    format!("Invalid value: '{r}'. Supported values are: 'system', 'developer', 'user', 'assistant', and 'tool'."),
                    &at("role"),
                ))
            }
            Some(_) => return Err(ValidationError::new(format!("Invalid type for '{}': expected a string.", at("role")), &at("role"))),
            None => return Err(ValidationError::new(format!("Missing required parameter: '{}'.", at("role")), &at("role"))),
        };
        let has_tool_calls = obj.get("tool_calls").is_some_and(|t| !t.is_null());
        let content = match obj.get("content") {
            Some(Value::String(s)) => Value::String(s.clone()),
            Some(Value::Array(parts)) => Value::String(text_parts(parts, i)?),
            None | Some(Value::Null) if role == "assistant" && has_tool_calls => Value::Null,
            None | Some(Value::Null) => {
                return Err(ValidationError::new(format!("Missing required parameter: '{}'.", at("content")), &at("content")))
            }
            Some(_) => {
                return Err(ValidationError::new(
                    format!("Invalid type for '{}': expected a string or an array of content parts.", at("content")),
                    &at("content"),
                ))
            }
        };
        let template_role = if role == "developer" { "system" } else { role };
        let mut msg = json!({"role": template_role, "content": content});
        for key in ["name", "tool_calls", "tool_call_id"] {
            if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
                msg[key] = v.clone();
            }
        }
        decode_tool_arguments(&mut msg);
        out.push(msg);
    }
    Ok(Value::Array(out))
}

/// Joins `[{"type":"text","text":...}]` parts; other part types are refused.
fn text_parts(parts: &[Value], i: usize) -> VResult<String> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let param = format!("messages[{i}].content[{j}]");
        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
            (Some("text"), Some(t)) => texts.push(t),
            (Some("text"), None) => return Err(ValidationError::new(format!("Missing required parameter: '{param}.text'."), &param)),
            (Some(other), _) => {
                return Err(ValidationError::new(
                    format!("Content parts of type '{other}' are not supported; only 'text' is."),
                    &format!("{param}.type"),
                ))
            }
            (None, _) => return Err(ValidationError::new(format!("Missing required parameter: '{param}.type'."), &param)),
        }
    }
    Ok(texts.join("\n"))
}

/// OpenAI sends a tool call's `function.arguments` as a JSON string; templates (Qwen2.5's
/// `arguments | tojson`) expect the object. Strings that are not JSON are left alone.
fn decode_tool_arguments(msg: &mut Value) {
    let Some(Value::Array(calls)) = msg.get_mut("tool_calls") else { return };
    for call in calls {
        if let Some(f) = call.get_mut("function").and_then(Value::as_object_mut) {
            if let Some(parsed) = f.get("arguments").and_then(Value::as_str).and_then(|a| serde_json::from_str::<Value>(a).ok()) {
                f.insert("arguments".into(), parsed);
            }
        }
    }
}
