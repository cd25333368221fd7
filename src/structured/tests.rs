//! Grammars against the real Qwen2 vocabulary (151,936 logits), driven by random "models": at
//! each step a random token the mask allows (now and then one of the allowed tokens that end a
//! string or a container, so that free strings end). Every finished walk must be JSON the schema
//! accepts; every tool-call walk must parse into calls to the declared functions.
use std::sync::{Arc, OnceLock};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::grammar::{functions, json_object, json_schema, tool_calls};
use super::*;
use crate::tools::{ToolFormat, ToolParsing};

const EOS: u32 = 151645; // <|im_end|>
const N_VOCAB: usize = 151_936;

fn tokenizer() -> Arc<tokenizers::Tokenizer> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/qwen-tokenizer/tokenizer.json");
    Arc::new(tokenizers::Tokenizer::from_file(path).expect("models/qwen-tokenizer/tokenizer.json loads"))
}

fn structured() -> &'static Structured {
    static S: OnceLock<Structured> = OnceLock::new();
    S.get_or_init(|| Structured::new(tokenizer(), N_VOCAB, Some(EOS)))
}

/// Token ids whose text holds a character that closes something (`"`, `]`, `}`).
fn closers() -> &'static Vec<u32> {
    static C: OnceLock<Vec<u32>> = OnceLock::new();
    C.get_or_init(|| {
        let t = tokenizer();
        (0..t.get_vocab_size(true) as u32)
            .filter(|&id| t.decode(&[id], false).is_ok_and(|s| s.len() <= 3 && s.contains(['"', ']', '}'])))
            .collect()
    })
}

/// Samples under `c` until EOS (true) or `max` tokens (false); returns the text.
fn walk(c: &Constraint, rng: &mut StdRng, max: usize) -> (String, bool) {
    let mut ids = Vec::new();
    for _ in 0..max {
        let mask = c.mask();
        let allowed = |t: u32| mask.is_allowed(t);
        if allowed(EOS) && rng.random_bool(0.7) {
            let text = structured().tokenizer.decode(&ids, false).expect("decodes");
            return (text, true);
        }
        let close: Vec<u32> = closers().iter().copied().filter(|&t| allowed(t)).collect();
        let token = if !close.is_empty() && rng.random_bool(0.3) {
            close[rng.random_range(0..close.len())]
        } else {
            let all: Vec<u32> = mask.iter().filter(|&t| t != EOS).collect();
            if all.is_empty() {
                assert!(allowed(EOS), "a mask with nothing allowed");
                continue;
            }
            all[rng.random_range(0..all.len())]
        };
        c.commit(token).expect("an allowed token is accepted");
        ids.push(token);
    }
    (structured().tokenizer.decode(&ids, false).expect("decodes"), false)
}

/// The subset of JSON Schema these tests use.
fn valid(v: &Value, s: &Value, defs: &Value) -> Result<(), String> {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or_default();
        return valid(v, &defs[name], defs);
    }
    if let Some(alts) = s.get("anyOf").and_then(Value::as_array) {
        return alts.iter().any(|a| valid(v, a, defs).is_ok()).then_some(()).ok_or(format!("{v} matches no anyOf of {s}"));
    }
    if let Some(c) = s.get("const") {
        return (v == c).then_some(()).ok_or(format!("{v} != const {c}"));
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return e.contains(v).then_some(()).ok_or(format!("{v} not in {e:?}"));
    }
    let ty = s.get("type").and_then(Value::as_str);
    let check = |ok: bool| if ok { Ok(()) } else { Err(format!("{v} is not a {ty:?}")) };
    match ty {
        Some("object") => {
            let o = v.as_object().ok_or(format!("{v} is not an object"))?;
            let props = s.get("properties").and_then(Value::as_object);
            for r in s.get("required").and_then(Value::as_array).into_iter().flatten() {
                o.get(r.as_str().unwrap_or_default()).ok_or(format!("{v} lacks required {r}"))?;
            }
            for (k, x) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => valid(x, ps, defs)?,
                    None if s.get("additionalProperties") == Some(&Value::Bool(false)) => return Err(format!("{v}: extra key {k}")),
                    None => {}
                }
            }
            Ok(())
        }
        Some("array") => {
            let a = v.as_array().ok_or(format!("{v} is not an array"))?;
            let n = a.len() as u64;
            if s.get("minItems").and_then(Value::as_u64).is_some_and(|m| n < m) || s.get("maxItems").and_then(Value::as_u64).is_some_and(|m| n > m) {
                return Err(format!("{v}: {n} items"));
            }
            a.iter().try_for_each(|x| s.get("items").map_or(Ok(()), |is| valid(x, is, defs)))
        }
        Some("string") => {
            let t = v.as_str().ok_or(format!("{v} is not a string"))?;
            let n = t.chars().count() as u64;
            check(!s.get("maxLength").and_then(Value::as_u64).is_some_and(|m| n > m) && !s.get("minLength").and_then(Value::as_u64).is_some_and(|m| n < m))
        }
        Some("integer") => {
            // JSON Schema integers are numbers without a fraction ("-0" and "1.0" included).
            let i = v.as_f64().filter(|f| f.fract() == 0.0).ok_or(format!("{v} is not an integer"))?;
            let bound = |k: &str| s.get(k).and_then(Value::as_f64);
            check(!bound("minimum").is_some_and(|m| i < m) && !bound("maximum").is_some_and(|m| i > m))
        }
        Some("number") => {
            let x = v.as_f64().ok_or(format!("{v} is not a number"))?;
            let bound = |k: &str| s.get(k).and_then(Value::as_f64);
            check(!bound("minimum").is_some_and(|m| x < m) && !bound("maximum").is_some_and(|m| x > m))
        }
        Some("boolean") => check(v.is_boolean()),
        Some("null") => check(v.is_null()),
        _ => Ok(()),
    }
}

fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
               "required": ["name", "age"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
                 "user": {"type": "object", "properties": {"id": {"type": "integer"}, "admin": {"type": "boolean"}}, "required": ["id", "admin"], "additionalProperties": false},
                 "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
                 "score": {"type": "number", "minimum": -100, "maximum": 100},
                 "note": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]}},
               "required": ["user", "tags", "note"], "additionalProperties": false}),
        json!({"type": "array", "items": {"type": "object", "properties": {"op": {"enum": ["add", "del"]}, "n": {"type": "integer", "minimum": -5, "maximum": 5}},
               "required": ["op", "n"], "additionalProperties": false}, "maxItems": 4}),
        json!({"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"], "additionalProperties": false}},
               "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}}, "required": ["from", "to"], "additionalProperties": false}),
        json!({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"], "additionalProperties": false}),
    ]
}

#[test]
fn random_walks_give_json_the_schema_accepts() {
    let mut rng = StdRng::seed_from_u64(1);
    for schema in schemas() {
        let defs = schema.get("$defs").cloned().unwrap_or(Value::Null);
        let cs = structured().constraints(json_schema(&schema).expect("grammar"), 12).expect("compiles");
        let mut finished = 0;
        for c in &cs {
            let (text, done) = walk(c, &mut rng, 400);
            if !done {
                continue; // a free string ran past the budget: cut, as max_tokens would cut it
            }
            finished += 1;
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?} for {schema}"));
            valid(&v, &schema, &defs).unwrap_or_else(|e| panic!("{e}: {text:?} for {schema}"));
            assert!(!text.contains("\n") && !text.contains("  "), "compact layout: {text:?}");
        }
        assert!(finished >= 9, "{finished}/12 walks finished for {schema}");
    }
}

#[test]
fn json_object_mode_gives_objects() {
    let mut rng = StdRng::seed_from_u64(2);
    for c in structured().constraints(json_object(), 10).expect("compiles") {
        let (text, done) = walk(&c, &mut rng, 300);
        if done {
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
            assert!(v.is_object(), "{text:?}");
        }
    }
}

#[test]
fn tool_call_grammars_parse_into_declared_calls() {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time"}}
    ]);
    let fs = functions(&tools);
    let names: Vec<String> = fs.iter().map(|f| f.name.clone()).collect();
    let mut rng = StdRng::seed_from_u64(3);
    for format in [ToolFormat::Hermes, ToolFormat::Llama3Json, ToolFormat::Mistral] {
        for parallel in [false, true] {
            let grammar = tool_calls(format, &fs, parallel).expect("grammar");
            let mut finished = 0;
            for c in structured().constraints(grammar, 10).expect("compiles") {
                let (text, done) = walk(&c, &mut rng, 400);
                if !done {
                    continue;
                }
                finished += 1;
                let p = crate::tools::parse(&ToolParsing { format, names: names.clone() }, &text);
                assert!(!p.calls.is_empty(), "{format:?}: no call in {text:?}");
                assert!(parallel || p.calls.len() == 1, "{format:?}: one call without parallel: {text:?}");
                assert_eq!(p.content, None, "{format:?}: nothing but calls: {text:?}");
                for call in &p.calls {
                    let args: Value = serde_json::from_str(&call.arguments).expect("arguments are JSON");
                    match call.name.as_str() {
                        "get_weather" => valid(&args, &tools[0]["function"]["parameters"], &Value::Null).expect("weather arguments"),
                        _ => assert_eq!(args, json!({}), "get_time takes no arguments"),
                    }
                }
            }
            assert!(finished >= 8, "{format:?} parallel={parallel}: {finished}/10 finished");
        }
    }
}

#[test]
fn schemas_the_engine_cannot_take_are_refused_with_a_reason() {
    for (schema, part) in [
        (json!({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}), "example.com"),
        (json!({"type": "string", "pattern": "(?<=a)b"}), "look-around"),
        (json!("not a schema"), "object"),
    ] {
        let err = json_schema(&schema)
            .and_then(|g| structured().constraints(g, 1).map(|_| ()))
            .expect_err(&format!("{schema} should be refused"));
        assert!(err.contains(part) || err.to_lowercase().contains(part), "{schema}: {err}");
    }
}

#[test]
fn masks_forbid_and_allow_exactly() {
    let c = structured().constraints(json_schema(&json!({"enum": ["yes", "no"]})).expect("grammar"), 1).expect("compiles").remove(0);
    let mask = c.mask();
    let mut logits = vec![0.5f32; N_VOCAB];
    constraint::apply(&mask, &mut logits);
    let allowed: Vec<usize> = (0..N_VOCAB).filter(|&i| logits[i].is_finite()).collect();
    assert!(!allowed.is_empty());
    let t = tokenizer();
    for &i in &allowed {
        let s = t.decode(&[i as u32], false).expect("decodes");
        assert!("\"yes\"".starts_with(&s) || "\"no\"".starts_with(&s), "allowed {i} = {s:?}");
    }
    assert!(!logits[EOS as usize].is_finite(), "EOS only once the value is complete");
}
