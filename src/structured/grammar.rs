//! Requests to grammars: a JSON schema, any JSON object, or the model's tool-call format around
//! the declared functions' parameter schemas.
//!
//! JSON is generated compactly with a space after `,` and `:` (`{"a": 1, "b": [2, 3]}`), with no
//! other whitespace: free whitespace lets a model pad an answer until it runs out of tokens.
use llguidance::api::TopLevelGrammar;
use llguidance::JsonCompileOptions;
use serde_json::{json, Value};

use crate::tools::ToolFormat;

/// How JSON is laid out in constrained answers.
fn options() -> JsonCompileOptions {
    JsonCompileOptions {
        item_separator: ", ".into(),
        key_separator: ": ".into(),
        whitespace_flexible: false,
        ..JsonCompileOptions::default()
    }
}

fn with_options(mut schema: Value) -> Value {
    options().apply_to(&mut schema);
    schema
}

/// `response_format: {"type": "json_object"}`: any JSON object.
pub fn json_object() -> TopLevelGrammar {
    TopLevelGrammar::from_json_schema(with_options(json!({"type": "object"})))
}

/// `response_format: {"type": "json_schema", ...}`: JSON valid under `schema` (an object;
/// `true`/`{}` mean any JSON value).
pub fn json_schema(schema: &Value) -> Result<TopLevelGrammar, String> {
    let schema = match schema {
        Value::Object(_) => schema.clone(),
        Value::Bool(true) => json!({}),
        _ => return Err("the schema must be a JSON object".into()),
    };
    Ok(TopLevelGrammar::from_json_schema(with_options(schema)))
}

/// One declared function: its name and parameter schema (OpenAI's `function.parameters`; none
/// means no arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    pub parameters: Option<Value>,
}

/// The functions of a request's `tools` array (validated elsewhere: each has a name).
pub fn functions(tools: &Value) -> Vec<Function> {
    tools
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let f = t.get("function")?;
            Some(Function { name: f.get("name")?.as_str()?.to_string(), parameters: f.get("parameters").cloned() })
        })
        .collect()
}

/// `tool_choice: "required"` or a named function: one call (or several, with `parallel`) to one
/// of `functions`, written as the model's `format` writes calls, and nothing else.
pub fn tool_calls(format: ToolFormat, functions: &[Function], parallel: bool) -> Result<TopLevelGrammar, String> {
    if functions.is_empty() {
        return Err("no functions to call".into());
    }
    let key = if format == ToolFormat::Llama3Json { "parameters" } else { "arguments" };
    let alternatives: Vec<Value> = functions
        .iter()
        .map(|f| {
            let params = match &f.parameters {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}, "additionalProperties": false}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(Value::Bool(true)) => json!({"type": "object"}),
                Some(_) => return Err(format!("the parameters of function '{}' are not a JSON schema object", f.name)),
            };
            Ok(json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, key: params},
                "required": ["name", key],
                "additionalProperties": false
            }))
        })
        .collect::<Result<_, String>>()?;
    let call = with_options(if alternatives.len() == 1 { alternatives[0].clone() } else { json!({"anyOf": alternatives}) });
    let call = serde_json::to_string(&call).map_err(|e| e.to_string())?;
    let (start, sep, end, one) = match format {
        ToolFormat::Hermes => ("", "\"\\n\"", "", "\"<tool_call>\\n\" obj \"\\n</tool_call>\""),
        ToolFormat::Llama3Json => ("", "\"; \"", "", "obj"),
        ToolFormat::Mistral => ("\"[\" ", "\", \"", " \"]\"", "obj"),
    };
    let many = if parallel { format!(" ({sep} call)*") } else { String::new() };
    let lark = format!("start: {start}call{many}{end}\ncall: {one}\nobj: %json {call}\n");
    Ok(TopLevelGrammar::from_lark(lark))
}
