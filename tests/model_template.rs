//! Chat templates rendered by minijinja must be byte-identical to Python jinja2 as transformers
//! runs it. Expected outputs: tests/fixtures/model/render_templates.py (cases in
//! template_cases.json). The templates come from the GGUF files' metadata.
use std::path::Path;

use inferd::model::gguf_tokenizer::read_gguf_assets;
use inferd::model::template::{ChatTemplate, TemplateError};
use inferd::model::{flatten_content, normalize_messages};
use serde_json::json;

const FIXTURES: &str = "tests/fixtures/model";
const MODELS: [(&str, &str); 2] = [
    ("qwen", "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ("smollm", "models/SmolLM2-135M-Instruct.Q4_1.gguf"),
];

#[test]
fn templates_render_like_python_jinja2() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/template_cases.json")).expect("cases"))
            .expect("cases json");
    let mut compared = 0;
    for (model, path) in MODELS {
        if !Path::new(path).exists() {
            eprintln!("SKIPPED {model}: {path} missing (run scripts/fetch_models.sh)");
            continue;
        }
        let assets = read_gguf_assets(Path::new(path)).expect("gguf assets");
        let source = assets.chat_template.expect("chat template in GGUF");
        let tmpl = ChatTemplate::new(&source, assets.bos_token, assets.eos_token).expect("compiles");
        for case in cases.as_array().expect("list") {
            let in_model = case["models"].as_array().expect("models").iter().any(|m| m == model);
            if !in_model {
                continue;
            }
            for agp in [false, true] {
                let name = format!("{model}_{}_{}.txt", case["name"].as_str().expect("name"), if agp { "gen" } else { "nogen" });
                let expected = std::fs::read_to_string(format!("{FIXTURES}/{name}")).expect("expected output");
                let got = tmpl.render(&case["messages"], case.get("tools"), agp).expect("renders");
                assert_eq!(got, expected, "{name}");
                compared += 1;
            }
        }
    }
    eprintln!("compared {compared} renderings");
}

#[test]
fn raise_exception_becomes_render_error_with_message() {
    let tmpl = ChatTemplate::new(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}ok",
        None,
        None,
    )
    .expect("compiles");
    match tmpl.render(&json!([{"role": "assistant", "content": "x"}]), None, true) {
        Err(TemplateError::Render(msg)) => {
            assert_eq!(msg, "Conversation roles must alternate user/assistant")
        }
        other => panic!("expected a render error, got {other:?}"),
    }
    assert_eq!(tmpl.render(&json!([{"role": "user", "content": "x"}]), None, true).expect("renders"), "ok");
}

#[test]
fn invalid_template_is_reported_at_compile_time() {
    match ChatTemplate::new("{% for m in messages %}{{ m.content }}", None, None) {
        Err(TemplateError::Invalid(msg)) => assert!(msg.contains("endfor") || msg.contains("end of input"), "{msg}"),
        Err(other) => panic!("expected Invalid, got {other:?}"),
        Ok(_) => panic!("an unclosed for loop must not compile"),
    }
}

#[test]
fn bos_eos_tojson_and_python_methods() {
    let tmpl = ChatTemplate::new(
        "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}|{{ m | tojson }}{% endfor %}\
         {{ tools | tojson(indent=2) }}{{ eos_token }}",
        Some("<s>".into()),
        Some("</s>".into()),
    )
    .expect("compiles");
    let out = tmpl
        .render(
            &json!([{"role": "user", "content": "  héllo <b>&'\"  "}]),
            Some(&json!([{"a": [1, 2.5, null, true], "b": {}}])),
            false,
        )
        .expect("renders");
    // Same bytes as Python: json.dumps(..., ensure_ascii=False) and json.dumps(tools, indent=2).
    let expected = "<s>HÉLLO <B>&'\"|{\"role\": \"user\", \"content\": \"  héllo <b>&'\\\"  \"}[\n  {\n    \"a\": [\n      1,\n      2.5,\n      null,\n      true\n    ],\n    \"b\": {}\n  }\n]</s>";
    assert_eq!(out, expected);
}

#[test]
fn content_parts_are_flattened_before_rendering() {
    let parts = json!([
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"}
    ]);
    let flat = flatten_content(&parts).expect("flattens");
    assert_eq!(flat[0]["content"], "Be brief.");
    assert_eq!(flat[1]["content"], "line one\nline two");
    assert!(flat[2]["content"].is_null());
    assert_eq!(flat[2]["tool_calls"][0]["function"]["arguments"], "{\"x\": 1}", "flatten leaves arguments alone");
    let normalized = normalize_messages(&parts).expect("normalizes");
    assert_eq!(normalized[2]["tool_calls"][0]["function"]["arguments"], json!({"x": 1}));
    assert_eq!(normalized[1]["content"], "line one\nline two");

    let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
    match flatten_content(&image) {
        Err(TemplateError::Render(msg)) => assert!(msg.contains("image_url"), "{msg}"),
        other => panic!("expected an error for image parts, got {other:?}"),
    }
    assert!(flatten_content(&json!({"role": "user"})).is_err(), "messages must be an array");
}

#[test]
fn qwen_template_renders_openai_style_tool_calls() {
    let path = MODELS[0].1;
    if !Path::new(path).exists() {
        eprintln!("SKIPPED: {path} missing");
        return;
    }
    let assets = read_gguf_assets(Path::new(path)).expect("assets");
    let tmpl = ChatTemplate::new(&assets.chat_template.expect("template"), None, None).expect("compiles");
    // OpenAI clients send arguments as a JSON string; after normalize_messages the rendering must
    // equal the fixture rendered from object arguments.
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/template_cases.json")).expect("cases"))
            .expect("json");
    let case = cases.as_array().expect("list").iter().find(|c| c["name"] == "tool_calls").expect("tool_calls case");
    let mut messages = case["messages"].clone();
    for msg in messages.as_array_mut().expect("list") {
        if let Some(calls) = msg.get_mut("tool_calls").and_then(|c| c.as_array_mut()) {
            for call in calls {
                let args = call["function"]["arguments"].to_string();
                call["function"]["arguments"] = serde_json::Value::String(args);
            }
        }
    }
    let got = tmpl.render(&normalize_messages(&messages).expect("normalize"), case.get("tools"), true).expect("renders");
    let expected = std::fs::read_to_string(format!("{FIXTURES}/qwen_tool_calls_gen.txt")).expect("fixture");
    assert_eq!(got, expected);
    assert_eq!(tmpl.render_openai(&messages, case.get("tools"), true).expect("renders"), expected);
    // Content parts render like the plain string.
    let parts = json!([{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]);
    let plain = json!([{"role": "user", "content": "Hi\nthere"}]);
    assert_eq!(tmpl.render_openai(&parts, None, true).unwrap(), tmpl.render(&plain, None, true).unwrap());
}

#[test]
fn tojson_keywords_match_python() {
    let tmpl = ChatTemplate::new(
        "{{ messages[0] | tojson(sort_keys=true, ensure_ascii=true) }} {{ messages[0] | tojson }}",
        None,
        None,
    )
    .expect("compiles");
    let out = tmpl.render(&json!([{"z": "é😀", "a": [1]}]), None, false).expect("renders");
    // python3 -c 'import json; m={"z":"é😀","a":[1]}; print(json.dumps(m, sort_keys=True, ensure_ascii=True), json.dumps(m, ensure_ascii=False))'
    assert_eq!(out, "{\"a\": [1], \"z\": \"\\u00e9\\ud83d\\ude00\"} {\"z\": \"é😀\", \"a\": [1]}");
    let bad = ChatTemplate::new("{{ messages | tojson(colour=1) }}", None, None).expect("compiles");
    assert!(matches!(bad.render(&json!([]), None, false), Err(TemplateError::Render(_))));
}
