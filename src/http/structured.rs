//! `response_format` and the enforced `tool_choice` values of a chat request: checked, turned into
//! a grammar, compiled against the model's vocabulary, one matcher per choice (`crate::structured`).
use llguidance::api::TopLevelGrammar;
use serde_json::Value;

use super::messages::{RequestTools, ToolChoice};
use super::state::ModelEntry;
use super::types::ResponseFormat;
use super::validate::{ValidationError, Validated};
use crate::structured::grammar;

type VResult<T> = Result<T, ValidationError>;

/// The grammar a chat request's answers must keep to, with the parameter it came from: a JSON
/// `response_format`, or `tool_choice` "required" / a named function. None: free text.
pub fn grammar_of(
    format: Option<&ResponseFormat>,
    tools: Option<&RequestTools>,
    parallel_tool_calls: Option<bool>,
    model: &ModelEntry,
) -> VResult<Option<(TopLevelGrammar, &'static str)>> {
    let from_format = match format {
        None => None,
        Some(rf) => match rf.kind.as_str() {
            "text" => None,
            "json_object" => Some((grammar::json_object(), "response_format")),
            "json_schema" => {
                let js = rf.json_schema.as_ref().ok_or_else(|| {
                    ValidationError::new("Missing required parameter: 'response_format.json_schema'.", "response_format.json_schema")
                })?;
                match js.get("name") {
                    Some(Value::String(n)) if !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {}
                    Some(_) => {
                        return Err(ValidationError::new(
                            "Invalid 'response_format.json_schema.name': use a-z, A-Z, 0-9, underscores and dashes, at most 64.",
                            "response_format.json_schema.name",
                        ))
                    }
                    None => {
                        return Err(ValidationError::new(
                            "Missing required parameter: 'response_format.json_schema.name'.",
                            "response_format.json_schema.name",
                        ))
                    }
                }
                let schema = js.get("schema").cloned().unwrap_or(Value::Bool(true));
                let g = grammar::json_schema(&schema).map_err(|e| {
                    ValidationError::new(format!("Invalid 'response_format.json_schema.schema': {e}."), "response_format.json_schema.schema")
                })?;
                Some((g, "response_format.json_schema.schema"))
            }
            other => {
                return Err(ValidationError::new(
                    format!("Invalid value: '{other}'. Supported values are: 'text', 'json_object' and 'json_schema'."),
                    "response_format.type",
                ))
            }
        },
    };
    let from_tools = match tools {
        Some(t) if t.choice != ToolChoice::Auto => {
            let Some(format) = model.tool_format else {
                return Err(ValidationError::new(
                    format!("The model `{}` has tool_call_parser = \"none\": 'tool_choice' cannot require a call.", model.id),
                    "tool_choice",
                ));
            };
            let mut functions = grammar::functions(&t.json);
            functions.retain(|f| t.names.contains(&f.name));
            let parallel = parallel_tool_calls.unwrap_or(true) && t.choice == ToolChoice::Required;
            let g = grammar::tool_calls(format, &functions, parallel).map_err(|e| ValidationError::new(format!("Invalid 'tools': {e}."), "tools"))?;
            Some((g, "tools"))
        }
        _ => None,
    };
    match (from_format, from_tools) {
        (Some(_), Some(_)) => Err(ValidationError::new(
            "'response_format' cannot be combined with 'tool_choice' \"required\" or a named function.",
            "response_format",
        )),
        (f, t) => Ok(f.or(t)),
    }
}

/// Compiles `grammar` for the model and gives each choice of `v` its own matcher; a schema or
/// function the grammar engine cannot take is a 400 naming `param` and what was refused.
pub fn constrain(v: &mut Validated, model: &ModelEntry, grammar: TopLevelGrammar, param: &str) -> VResult<()> {
    let cs = model
        .structured
        .constraints(grammar, v.requests.len())
        .map_err(|e| ValidationError::new(format!("This schema cannot be enforced: {e}"), param))?;
    for (r, c) in v.requests.iter_mut().zip(cs) {
        r.constraint = Some(c);
    }
    Ok(())
}
