use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::stream::{Out, ToolStream};
use super::*;

fn spec(format: ToolFormat) -> ToolParsing {
    ToolParsing { format, names: vec!["get_weather".into(), "get_time".into()] }
}

fn calls(p: &Parsed) -> Vec<(&str, serde_json::Value)> {
    p.calls.iter().map(|c| (c.name.as_str(), serde_json::from_str(&c.arguments).expect("arguments are JSON"))).collect()
}

#[test]
fn hermes_one_call() {
    let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let p = parse(&spec(ToolFormat::Hermes), text);
    assert_eq!(p.content, None);
    assert_eq!(calls(&p), vec![("get_weather", serde_json::json!({"city": "Paris"}))]);
    assert_eq!(p.calls[0].arguments, "{\"city\": \"Paris\"}", "the model's own text");
    assert!(p.calls[0].id.starts_with("call_") && p.calls[0].id.len() == 29);
}

#[test]
fn hermes_parallel_calls_with_content_before() {
    let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
    let p = parse(&spec(ToolFormat::Hermes), text);
    assert_eq!(p.content.as_deref(), Some("Let me check."));
    assert_eq!(calls(&p), vec![("get_weather", serde_json::json!({"city": "Paris"})), ("get_time", serde_json::json!({}))]);
    assert_ne!(p.calls[0].id, p.calls[1].id);
}

#[test]
fn hermes_unclosed_block_at_the_end_is_a_call_when_complete() {
    let text = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}";
    let p = parse(&spec(ToolFormat::Hermes), text);
    assert_eq!(calls(&p), vec![("get_time", serde_json::json!({"tz": "UTC"}))]);
}

#[test]
fn what_only_looks_like_a_call_stays_content() {
    for text in [
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par",            // cut off
        "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>",                       // unknown tool
        "<tool_call>not json</tool_call> and more",                                           // not JSON
        "<tool_call>{\"name\": \"get_time\", \"arguments\": [1, 2]}</tool_call>",                // not an object
        "Use <tool_call to call tools.",                                                      // marker prefix only
        "a < b and <tool",                                                                    // held tail flushed
        "",
    ] {
        let p = parse(&spec(ToolFormat::Hermes), text);
        assert!(p.calls.is_empty(), "{text:?} gave calls {:?}", p.calls);
        assert_eq!(p.content.as_deref(), Some(text), "content kept byte for byte");
    }
}

#[test]
fn hermes_bare_call_objects_without_tags() {
    // What Qwen2.5-Coder-0.5B writes for a weather question with one tool declared.
    let s = spec(ToolFormat::Hermes);
    let p = parse(&s, "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}");
    assert_eq!(calls(&p), vec![("get_weather", serde_json::json!({"city": "Paris"}))]);
    assert_eq!(p.content, None);
    let p = parse(&s, "\n{\"name\": \"get_time\", \"arguments\": {}}\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}");
    assert_eq!(p.calls.len(), 2);
    for text in ["{\"name\": \"unknown\", \"arguments\": {}}", "{\"a\": 1} and text", "{\"name\": \"get_time\"} <tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>"] {
        let p = parse(&s, text);
        if text.contains("</tool_call>") {
            assert_eq!(p.calls.len(), 1, "a block after other text is still a call: {text:?}");
        } else {
            assert!(p.calls.is_empty(), "{text:?}");
            assert_eq!(p.content.as_deref(), Some(text));
        }
    }
}

#[test]
fn arguments_as_a_json_string_are_accepted() {
    let text = "<tool_call>{\"name\": \"get_time\", \"arguments\": \"{\\\"tz\\\": \\\"UTC\\\"}\"}</tool_call>";
    let p = parse(&spec(ToolFormat::Hermes), text);
    assert_eq!(calls(&p), vec![("get_time", serde_json::json!({"tz": "UTC"}))]);
}

#[test]
fn llama3_json_calls() {
    let s = spec(ToolFormat::Llama3Json);
    let p = parse(&s, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}");
    assert_eq!(calls(&p), vec![("get_weather", serde_json::json!({"city": "Oslo"}))]);
    assert_eq!(p.content, None);
    let p = parse(&s, "<|python_tag|>{\"name\": \"get_time\", \"parameters\": {}}; {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}");
    assert_eq!(calls(&p), vec![("get_time", serde_json::json!({})), ("get_weather", serde_json::json!({"city": "Rome"}))]);
    for text in ["The answer is {\"name\": 1}", "{\"name\": \"get_time\", \"parameters\": {}} trailing words", "{\"oops\": true}", "  plain text"] {
        let p = parse(&s, text);
        assert!(p.calls.is_empty(), "{text:?}");
        assert_eq!(p.content.as_deref(), Some(text));
    }
}

#[test]
fn mistral_calls() {
    let s = spec(ToolFormat::Mistral);
    let p = parse(&s, "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}, {\"name\": \"get_time\", \"arguments\": {}}]");
    assert_eq!(calls(&p), vec![("get_weather", serde_json::json!({"city": "Lima"})), ("get_time", serde_json::json!({}))]);
    let p = parse(&s, "[{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}]");
    assert_eq!(calls(&p), vec![("get_time", serde_json::json!({"tz": "UTC"}))]);
    let p = parse(&s, "[1, 2, 3] are numbers");
    assert!(p.calls.is_empty());
}

#[test]
fn detection_from_templates() {
    assert_eq!(ToolFormat::detect("{{- '<tool_call>\\n' }}"), ToolFormat::Hermes);
    assert_eq!(ToolFormat::detect("{{ '<|python_tag|>' }}"), ToolFormat::Llama3Json);
    assert_eq!(ToolFormat::detect("{{ '[TOOL_CALLS]' }}"), ToolFormat::Mistral);
    assert_eq!(ToolFormat::detect("<|im_start|>"), ToolFormat::Hermes);
}

/// Streams `text` in the given pieces; returns (content, [(name, arguments)], argument pieces).
fn run(s: &ToolParsing, pieces: &[&str]) -> (String, Vec<(String, String)>, usize) {
    let mut st = ToolStream::new(s.clone());
    let mut outs = Vec::new();
    for p in pieces {
        outs.extend(st.push(p));
    }
    outs.extend(st.finish());
    let (mut content, mut calls, mut arg_pieces) = (String::new(), Vec::<(String, String)>::new(), 0);
    for o in outs {
        match o {
            Out::Content(t) => content.push_str(&t),
            Out::CallStart { index, name, .. } => {
                assert_eq!(index, calls.len(), "calls are numbered in order");
                calls.push((name, String::new()));
            }
            Out::CallArguments { index, text } => {
                calls[index].1.push_str(&text);
                arg_pieces += 1;
            }
        }
    }
    (content, calls, arg_pieces)
}

#[test]
fn arguments_stream_in_the_models_pieces() {
    let pieces = ["<tool_call>", "\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\"", ": \"Paris\"}}", "\n</tool_call>"];
    let (content, calls, arg_pieces) = run(&spec(ToolFormat::Hermes), &pieces);
    assert_eq!(content, "");
    assert_eq!(calls, vec![("get_weather".to_string(), "{\"city\": \"Paris\"}".to_string())]);
    assert_eq!(arg_pieces, 2, "split where the model's third piece began");
}

/// Property: however the answer is cut into pieces, the stream gives the same content and calls
/// as the whole answer. Random answers mix content, good and broken blocks, markers cut anywhere.
#[test]
fn any_split_gives_the_whole_answers_result() {
    let mut rng = StdRng::seed_from_u64(7);
    let parts = [
        "Sure. ",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich ☀\"}}\n</tool_call>",
        "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>",
        "<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>",
        "<tool_call>{broken</tool_call>",
        "a <tool_ca",
        "ll> b ",
        "<",
        "\n",
        "ünïcödé ",
        "{\"name\": \"get_time\", \"arguments\": {}}",
        "  ",
    ];
    let formats = [ToolFormat::Hermes, ToolFormat::Llama3Json, ToolFormat::Mistral];
    let json_parts = ["{\"name\": \"get_time\", \"parameters\": {}}", "; ", "[{\"name\": \"get_time\", \"arguments\": {\"a\": 1}}]", " text", "[TOOL_CALLS]", "<|python_tag|>", " "];
    for case in 0..600 {
        let format = formats[case % 3];
        let pool: &[&str] = if format == ToolFormat::Hermes { &parts } else { &json_parts };
        let text: String = (0..rng.random_range(0..6)).map(|_| pool[rng.random_range(0..pool.len())]).collect();
        let s = spec(format);
        let whole = run(&s, &[&text]);
        // Random cuts at char boundaries.
        let mut cuts: Vec<usize> = (0..rng.random_range(0..8)).map(|_| rng.random_range(0..=text.len())).filter(|&c| text.is_char_boundary(c)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces = Vec::new();
        let mut at = 0;
        for c in cuts.into_iter().chain([text.len()]) {
            pieces.push(&text[at..c]);
            at = c;
        }
        let split = run(&s, &pieces);
        assert_eq!((&split.0, &split.1), (&whole.0, &whole.1), "{format:?} {text:?} cut as {pieces:?}");
        // Nothing is lost or invented: content plus the calls' text covers the answer.
        if whole.1.is_empty() {
            assert_eq!(whole.0, text);
        }
    }
}
