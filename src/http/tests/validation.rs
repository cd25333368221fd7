//! One test per validation rule: exact params and message fragments.
use std::sync::Arc;

use serde_json::{json, Value};

use super::support::{entry, hello_script, tokenizer, FakeGen, MODEL};
use crate::http::extract::parse_body;
use crate::http::types::{ChatCompletionRequest, CompletionRequest};
use crate::http::validate::{validate_chat, validate_completion, Validated, ValidationError};

fn chat(body: Value) -> Result<Validated, ValidationError> {
    let req: ChatCompletionRequest = parse_body(body.to_string().as_bytes()).expect("parses");
    let mut g = FakeGen::new(vec![hello_script()]);
    g.ctx = 64;
    validate_chat(&req, &entry(Arc::new(g), MODEL), 16)
}

fn text(body: Value) -> Result<Validated, ValidationError> {
    let req: CompletionRequest = parse_body(body.to_string().as_bytes()).expect("parses");
    let mut g = FakeGen::new(vec![hello_script()]);
    g.ctx = 64;
    validate_completion(&req, &entry(Arc::new(g), MODEL), 16)
}

fn with(extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
    for (k, v) in extra.as_object().expect("object") {
        b[k] = v.clone();
    }
    b
}

fn err_chat(extra: Value) -> ValidationError {
    chat(with(extra)).expect_err("must be rejected")
}

fn assert_err(e: ValidationError, param: &str, fragment: &str) {
    assert_eq!(e.param.as_deref(), Some(param), "{e:?}");
    assert!(e.message.contains(fragment), "message {:?} lacks {fragment:?}", e.message);
}

#[test]
fn chat_prompt_is_the_rendered_template_tokenised() {
    let v = chat(with(json!({}))).expect("valid");
    let expected = tokenizer().encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", false).expect("encodes");
    let ids = v.requests[0].prompt_tokens.clone();
    assert_eq!(ids, expected.get_ids());
    assert_eq!(ids[0], 151644, "<|im_start|> is one special token");
    assert_eq!(ids.iter().filter(|&&t| t == 151645).count(), 1, "one <|im_end|>");
    assert_eq!(v.prompt_tokens, ids.len());
    assert_eq!(v.requests[0].max_new_tokens, 64 - ids.len(), "default budget = remaining context");
    assert_eq!(v.requests[0].sampling.temperature, 1.0);
    assert!(!v.stream && v.logprobs.is_none());
}

#[test]
fn content_parts_and_developer_role() {
    let parts = json!({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]});
    let v = chat(with(parts)).expect("valid");
    let want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(v.requests[0].prompt_tokens, tokenizer().encode(want, false).expect("encodes").get_ids());
    let img = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]});
    assert_err(err_chat(img), "messages[0].content[0].type", "'image_url' are not supported");
}

#[test]
fn unknown_role_and_bad_messages() {
    assert_err(err_chat(json!({"messages": [{"role": "wizard", "content": "x"}]})), "messages[0].role", "Invalid value: 'wizard'");
    assert_err(err_chat(json!({"messages": []})), "messages", "at least one message");
    assert_err(err_chat(json!({"messages": [{"role": "user"}]})), "messages[0].content", "Missing required parameter");
    assert_err(err_chat(json!({"messages": ["hi"]})), "messages[0]", "expected an object");
    assert_err(chat(json!({"model": MODEL})).expect_err("no messages"), "messages", "Missing required parameter: 'messages'");
}

#[test]
fn sampling_ranges() {
    assert_err(err_chat(json!({"temperature": 2.5})), "temperature", "expected a value in [0, 2], but got 2.5");
    assert_err(err_chat(json!({"temperature": -0.1})), "temperature", "[0, 2]");
    assert_err(err_chat(json!({"top_p": 0})), "top_p", "(0, 1]");
    assert_err(err_chat(json!({"top_p": 1.1})), "top_p", "(0, 1]");
    assert_err(err_chat(json!({"top_k": -2})), "top_k", "Expected a value >= -1, but got -2");
    assert_err(err_chat(json!({"min_p": 1.5})), "min_p", "[0, 1]");
    assert_err(err_chat(json!({"presence_penalty": 3})), "presence_penalty", "[-2, 2]");
    assert_err(err_chat(json!({"frequency_penalty": -2.5})), "frequency_penalty", "[-2, 2]");
    assert_err(err_chat(json!({"repetition_penalty": 0})), "repetition_penalty", "expected a value > 0");
    assert_err(err_chat(json!({"seed": 1.5})), "seed", "expected an integer");
    let v = chat(with(json!({"temperature": 0, "top_p": 0.5, "top_k": -1, "min_p": 0.1, "presence_penalty": -2,
        "frequency_penalty": 1.5, "repetition_penalty": 1.1, "seed": -1}))).expect("valid");
    let s = &v.requests[0].sampling;
    assert_eq!((s.temperature, s.top_p, s.top_k, s.min_p), (0.0, 0.5, 0, 0.1));
    assert_eq!((s.presence_penalty, s.frequency_penalty, s.repetition_penalty), (-2.0, 1.5, 1.1));
    assert_eq!(s.seed, Some(u64::MAX), "negative seeds wrap");
    assert_eq!(chat(with(json!({"top_k": 40}))).expect("valid").requests[0].sampling.top_k, 40);
}

#[test]
fn logit_bias_keys_and_values() {
    let v = chat(with(json!({"logit_bias": {"9707": -100, "198": 5.5}}))).expect("valid");
    let lb = &v.requests[0].sampling.logit_bias;
    assert_eq!((lb.get(&9707), lb.get(&198), lb.len()), (Some(&-100.0), Some(&5.5), 2));
    assert_err(err_chat(json!({"logit_bias": {"abc": 1}})), "logit_bias", "'abc' is not a token id");
    assert_err(err_chat(json!({"logit_bias": {"99999999": 1}})), "logit_bias", "'99999999' is not a token id");
    assert_err(err_chat(json!({"logit_bias": {"1": 101}})), "logit_bias", "[-100, 100]");
}

#[test]
fn stop_sequences() {
    assert_eq!(chat(with(json!({"stop": "\n\n"}))).expect("valid").requests[0].stop, vec!["\n\n".to_string()]);
    assert_eq!(chat(with(json!({"stop": ["a", "b"]}))).expect("valid").requests[0].stop, vec!["a", "b"]);
    assert_err(err_chat(json!({"stop": ["a", "b", "c", "d", "e"]})), "stop", "maximum length 4");
    assert_err(err_chat(json!({"stop": ["a", ""]})), "stop", "must not be empty");
}

#[test]
fn max_tokens_and_context() {
    let v = chat(with(json!({"max_tokens": 5}))).expect("valid");
    assert_eq!(v.requests[0].max_new_tokens, 5);
    let v = chat(with(json!({"max_tokens": 5, "max_completion_tokens": 7}))).expect("valid");
    assert_eq!(v.requests[0].max_new_tokens, 7, "max_completion_tokens wins");
    assert_err(err_chat(json!({"max_tokens": 0})), "max_tokens", "Expected a value >= 1, but got 0");
    let p = chat(with(json!({}))).expect("valid").prompt_tokens;
    let e = err_chat(json!({"max_tokens": 100}));
    assert_err(e.clone(), "messages", &format!(
        "This model's maximum context length is 64 tokens. However, you requested {} tokens ({p} in the messages, 100 in the completion)", p + 100));
    assert_eq!(e.code, Some("context_length_exceeded"));
    let long = "word ".repeat(100);
    let e = err_chat(json!({"messages": [{"role": "user", "content": long}]}));
    assert_err(e, "messages", "maximum context length is 64 tokens. However, your messages resulted in");
    assert!(chat(with(json!({"max_tokens": 64 - p}))).is_ok(), "exactly the context is fine");
}

#[test]
fn n_seeds_logprobs_stream_options() {
    let v = chat(with(json!({"n": 3, "seed": 10}))).expect("valid");
    let seeds: Vec<_> = v.requests.iter().map(|r| r.sampling.seed).collect();
    assert_eq!(seeds, vec![Some(10), Some(11), Some(12)]);
    assert_err(err_chat(json!({"n": 0})), "n", ">= 1");
    assert_err(err_chat(json!({"n": 17})), "n", "<= 16");
    assert_eq!(chat(with(json!({"logprobs": true, "top_logprobs": 3}))).expect("valid").requests[0].logprobs, Some(3));
    assert_eq!(chat(with(json!({"logprobs": true}))).expect("valid").logprobs, Some(0));
    assert_err(err_chat(json!({"logprobs": true, "top_logprobs": 21})), "top_logprobs", "<= 20");
    assert_err(err_chat(json!({"top_logprobs": 2})), "top_logprobs", "requires 'logprobs'");
    assert_err(err_chat(json!({"stream_options": {"include_usage": true}})), "stream_options", "only allowed when 'stream'");
    let v = chat(with(json!({"stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true}))).expect("valid");
    assert!(v.stream && v.include_usage && v.requests[0].ignore_eos);
}

#[test]
fn response_format_and_tools() {
    assert!(chat(with(json!({"response_format": {"type": "text"}}))).is_ok());
    assert!(chat(with(json!({"response_format": {"type": "text"}}))).expect("valid").requests[0].constraint.is_none());
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    assert!(chat(with(json!({"tools": tools, "tool_choice": "auto"}))).expect("valid").requests[0].constraint.is_none());
    assert_err(err_chat(json!({"tools": tools, "tool_choice": "sometimes"})), "tool_choice", "'sometimes'");
}

#[test]
fn structured_outputs_give_each_choice_a_constraint() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    for extra in [
        json!({"response_format": {"type": "json_object"}, "n": 3}),
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": true}}, "n": 3}),
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "anything"}}, "n": 3}),
        json!({"tools": tools, "tool_choice": "required", "n": 3}),
        json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}, "n": 3}),
    ] {
        let v = chat(with(extra.clone())).unwrap_or_else(|e| panic!("{extra}: {e:?}"));
        assert_eq!(v.requests.len(), 3);
        assert!(v.requests.iter().all(|r| r.constraint.is_some()), "{extra}");
        // Each choice has its own matcher: advancing one leaves the others at the start.
        let first = v.requests[0].constraint.as_ref().expect("constraint").mask();
        let brace = crate::http::tests::support::tokenizer().token_to_id("{").or_else(|| crate::http::tests::support::tokenizer().token_to_id("<tool_call>"));
        if let Some(t) = brace.filter(|&t| first.is_allowed(t)) {
            v.requests[0].constraint.as_ref().expect("constraint").commit(t).expect("allowed");
            assert_eq!(v.requests[1].constraint.as_ref().expect("constraint").mask().as_slice(), first.as_slice());
        }
    }
    assert_err(err_chat(json!({"response_format": {"type": "xml"}})), "response_format.type", "'xml'");
    assert_err(err_chat(json!({"response_format": {"type": "json_schema"}})), "response_format.json_schema", "Missing");
    assert_err(err_chat(json!({"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})), "response_format.json_schema.name", "Missing");
    assert_err(err_chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": schema}}})), "response_format.json_schema.name", "underscores");
    assert_err(err_chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}})), "response_format.json_schema.schema", "JSON object");
    let lookbehind = json!({"type": "string", "pattern": "(?<=a)b"});
    assert_err(err_chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": lookbehind}}})), "response_format.json_schema.schema", "look-around");
    let both = json!({"tools": tools, "tool_choice": "required", "response_format": {"type": "json_object"}});
    assert_err(err_chat(both), "response_format", "cannot be combined");
}

#[test]
fn completion_prompts() {
    let v = text(json!({"model": MODEL, "prompt": "Hello world"})).expect("valid");
    assert_eq!(v.requests[0].prompt_tokens, vec![9707, 1879]);
    let v = text(json!({"model": MODEL, "prompt": ["Hello"]})).expect("valid");
    assert_eq!(v.requests[0].prompt_tokens, vec![9707]);
    let v = text(json!({"model": MODEL, "prompt": [9707, 1879, 0]})).expect("valid");
    assert_eq!(v.requests[0].prompt_tokens, vec![9707, 1879, 0]);
    let v = text(json!({"model": MODEL, "prompt": [[9707]], "logprobs": 5})).expect("valid");
    assert_eq!((v.requests[0].prompt_tokens.clone(), v.logprobs), (vec![9707], Some(5)));
    let e = |b: Value| text(b).expect_err("must be rejected");
    assert_err(e(json!({"model": MODEL, "prompt": ["a", "b"]})), "prompt", "Batched prompts are not supported");
    assert_err(e(json!({"model": MODEL, "prompt": [9999999]})), "prompt", "Invalid token id 9999999");
    assert_err(e(json!({"model": MODEL, "prompt": [-1]})), "prompt", "Invalid token id -1");
    assert_err(e(json!({"model": MODEL, "prompt": ""})), "prompt", "at least one token");
    assert_err(e(json!({"model": MODEL})), "prompt", "Missing required parameter: 'prompt'");
    assert_err(e(json!({"model": MODEL, "prompt": "x", "logprobs": 6})), "logprobs", "<= 5");
    assert_err(e(json!({"model": MODEL, "prompt": "x", "echo": true})), "echo", "not supported");
    assert_err(e(json!({"model": MODEL, "prompt": "x", "best_of": 3})), "best_of", "must equal 'n'");
    assert_err(e(json!({"model": MODEL, "prompt": "Hello", "max_tokens": 64})), "prompt", "(1 in your prompt; 64 for the completion)");
}

#[test]
fn wrong_types_name_the_field() {
    let e = parse_body::<ChatCompletionRequest>(br#"{"model":"m","messages":[],"temperature":"hot"}"#).expect_err("type error");
    assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("temperature")));
    assert!(e.message.contains("Invalid value for 'temperature'"), "{}", e.message);
    let e = parse_body::<ChatCompletionRequest>(br#"{"model":"m","n":1.5}"#).expect_err("type error");
    assert_eq!(e.param.as_deref(), Some("n"));
    let e = parse_body::<ChatCompletionRequest>(br#"{"model": 5}"#).expect_err("type error");
    assert_eq!(e.param.as_deref(), Some("model"));
    let e = parse_body::<ChatCompletionRequest>(b"[1,2]").expect_err("not an object");
    assert!(e.message.contains("must be a JSON object"));
    let e = parse_body::<ChatCompletionRequest>(b"{\"model\":").expect_err("malformed");
    assert!(e.message.contains("We could not parse the JSON body"));
    let ok = parse_body::<ChatCompletionRequest>(br#"{"model":"m","user":"u","metadata":{"a":1},"temperature":null}"#);
    assert!(ok.is_ok(), "unknown fields and nulls are tolerated");
}

#[test]
fn token_ids_must_fit_the_model_vocab_too() {
    let mut g = FakeGen::new(vec![hello_script()]);
    g.vocab = Some(1000);
    let m = entry(Arc::new(g), MODEL);
    let req: CompletionRequest = parse_body(br#"{"model":"m","prompt":[999, 1000]}"#).expect("parses");
    let e = validate_completion(&req, &m, 16).expect_err("1000 is outside the logits");
    assert_err(e, "prompt", "Invalid token id 1000 in 'prompt' (vocabulary size 1000)");
    let req: CompletionRequest = parse_body(br#"{"model":"m","prompt":[1],"logit_bias":{"1000":1}}"#).expect("parses");
    assert_err(validate_completion(&req, &m, 16).expect_err("bias outside"), "logit_bias", "'1000' is not a token id");
}

#[test]
fn tool_call_arguments_reach_the_template_as_objects() {
    let tmpl = "{% for m in messages %}{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}{% else %}{{ m.content }}{% endif %}|{% endfor %}";
    let mut e = entry(Arc::new(FakeGen::new(vec![hello_script()])), MODEL);
    e.chat_template = Some(Arc::new(crate::model::template::ChatTemplate::new(tmpl, None, None).expect("compiles")));
    let body = json!({"model": MODEL, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]});
    let req: ChatCompletionRequest = parse_body(body.to_string().as_bytes()).expect("parses");
    let v = validate_chat(&req, &e, 16).expect("valid");
    let text = tokenizer().decode(&v.requests[0].prompt_tokens, false).expect("decodes");
    assert_eq!(text, "weather?|Paris|sunny|");
}
