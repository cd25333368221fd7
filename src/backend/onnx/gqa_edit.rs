//! A load-time edit of the graph: `GroupQueryAttention` nodes run on inferd's CPU kernel
//! ([`super::gqa`]) instead of ONNX Runtime's.
//!
//! The edit moves each node the kernel supports from the `com.microsoft` domain to
//! [`gqa::DOMAIN`](super::gqa::DOMAIN) (inputs, outputs and attributes stay) and imports that
//! domain into the model. A node is left on ONNX Runtime's kernel when it uses anything the
//! kernel does not implement: a local window, softcap, smooth softmax, the QK output, inputs
//! after `sin_cache` (position ids, attention bias, head sinks) or a past cache that is not f32.
use std::collections::HashMap;

use super::gqa::{DOMAIN, OP};
use super::proto::{encode, fields, graph_field, put_bytes, put_int, strings, varint, Field, ATTRIBUTE_FLOAT, ATTRIBUTE_INT, ATTRIBUTE_NAME, GRAPH_INPUT, GRAPH_NODE, MODEL_OPSET_IMPORT, NODE_ATTRIBUTE, NODE_DOMAIN, NODE_INPUT, NODE_OP_TYPE};

/// Attributes the kernel reads; any other makes the node stay on ONNX Runtime's kernel unless
/// it has the value that means "off".
const ATTRIBUTES: [&str; 5] = ["num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved"];
/// Inputs the kernel takes: query, key, value, past key, past value, seqlens_k,
/// total_sequence_length, cos_cache, sin_cache.
const INPUTS: usize = 9;

/// An attribute's value, as far as the checks here need it.
#[derive(Debug, PartialEq)]
enum Value {
    Int(i64),
    Float(f32),
    Other,
}

/// An AttributeProto's name and value.
fn attribute(data: &[u8]) -> Result<(Vec<u8>, Value), String> {
    let fs = fields(data)?;
    let name = strings(&fs, ATTRIBUTE_NAME).first().copied().unwrap_or_default().to_vec();
    let value = if let Some(f) = fs.iter().find(|f| f.num == ATTRIBUTE_FLOAT && f.wire == 5) {
        Value::Float(f32::from_le_bytes(f.data.try_into().map_err(|_| "bad float attribute")?))
    } else if let Some(f) = fs.iter().find(|f| f.num == ATTRIBUTE_INT && f.wire == 0) {
        Value::Int(varint(f.data, &mut 0)? as i64)
    } else {
        Value::Other
    };
    Ok((name, value))
}

/// Whether an attribute the kernel does not read has the value that switches its feature off.
fn off(name: &[u8], value: &Value) -> bool {
    match name {
        b"local_window_size" => *value == Value::Int(-1),
        b"softcap" => *value == Value::Float(0.0),
        b"smooth_softmax" | b"qk_output" => *value == Value::Int(0),
        _ => false,
    }
}

/// The element type of each graph input (TensorProto.DataType; 1 = FLOAT).
fn input_types(graph: &[Field<'_>]) -> Result<HashMap<Vec<u8>, u64>, String> {
    let mut out = HashMap::new();
    for f in graph.iter().filter(|f| f.num == GRAPH_INPUT) {
        let vi = fields(f.data)?;
        let name = strings(&vi, 1).first().copied().unwrap_or_default().to_vec();
        // ValueInfoProto.type(2) -> TypeProto.tensor_type(1) -> elem_type(1)
        let elem = (|| -> Result<Option<u64>, String> {
            let Some(ty) = strings(&vi, 2).first().copied() else { return Ok(None) };
            let Some(tensor) = strings(&fields(ty)?, 1).first().copied() else { return Ok(None) };
            fields(tensor)?.iter().find(|f| f.num == 1 && f.wire == 0).map(|f| varint(f.data, &mut 0)).transpose()
        })()?;
        if let Some(e) = elem {
            out.insert(name, e);
        }
    }
    Ok(out)
}

/// The node (its NodeProto bytes) moved to [`DOMAIN`], or None when the kernel does not support it.
fn reroute_node(data: &[u8], types: &HashMap<Vec<u8>, u64>) -> Result<Option<Vec<u8>>, String> {
    let nf = fields(data)?;
    if strings(&nf, NODE_OP_TYPE).first().copied() != Some(OP.as_bytes()) || strings(&nf, NODE_DOMAIN).first().copied() != Some(&b"com.microsoft"[..]) {
        return Ok(None);
    }
    for a in strings(&nf, NODE_ATTRIBUTE) {
        let (name, value) = attribute(a)?;
        if !ATTRIBUTES.iter().any(|n| n.as_bytes() == name.as_slice()) && !off(&name, &value) {
            return Ok(None);
        }
    }
    let inputs = strings(&nf, NODE_INPUT);
    if inputs.iter().skip(INPUTS).any(|i| !i.is_empty()) {
        return Ok(None);
    }
    // The past cache must be an f32 graph input (the server's KV buffers).
    match inputs.get(3) {
        Some(past) if types.get(*past) == Some(&1) => {}
        _ => return Ok(None),
    }
    // Write the node back without its trailing empty inputs, in the new domain.
    let mut out = Vec::with_capacity(data.len() + DOMAIN.len());
    let mut seen_inputs = 0;
    for f in nf.iter() {
        if f.num == NODE_INPUT {
            seen_inputs += 1;
            if seen_inputs > INPUTS {
                continue;
            }
        }
        if f.num == NODE_DOMAIN {
            put_bytes(&mut out, NODE_DOMAIN, DOMAIN.as_bytes());
            continue;
        }
        out.extend_from_slice(&encode(std::slice::from_ref(f)));
    }
    Ok(Some(out))
}

/// `model` (the bytes of a `model.onnx`, possibly already edited) with every
/// `GroupQueryAttention` node the kernel supports on [`DOMAIN`], and the number of such nodes;
/// `Ok(None)` when there is none.
pub fn reroute(model: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let top = fields(model)?;
    let gi = graph_field(&top)?;
    let graph = fields(top[gi].data)?;
    let types = input_types(&graph)?;
    let mut rerouted: Vec<(usize, Vec<u8>)> = Vec::new();
    for (i, f) in graph.iter().enumerate().filter(|(_, f)| f.num == GRAPH_NODE) {
        if let Some(node) = reroute_node(f.data, &types)? {
            rerouted.push((i, node));
        }
    }
    if rerouted.is_empty() {
        return Ok(None);
    }
    let mut graph = graph;
    for (i, node) in &rerouted {
        graph[*i] = Field { num: GRAPH_NODE, wire: 2, data: node };
    }
    let new_graph = encode(&graph);
    let mut top = top;
    top[gi].data = &new_graph;
    // OperatorSetIdProto: domain(1), version(2).
    let mut opset = Vec::new();
    put_bytes(&mut opset, 1, DOMAIN.as_bytes());
    put_int(&mut opset, 2, 1);
    let has_domain = top.iter().filter(|f| f.num == MODEL_OPSET_IMPORT).any(|f| fields(f.data).is_ok_and(|o| strings(&o, 1).first().copied() == Some(DOMAIN.as_bytes())));
    if !has_domain {
        top.push(Field { num: MODEL_OPSET_IMPORT, wire: 2, data: &opset });
    }
    Ok(Some((encode(&top), rerouted.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::onnx::proto::MODEL_GRAPH;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx").join(name).join("model.onnx")).unwrap()
    }

    fn ops(model: &[u8]) -> Vec<(String, String)> {
        let top = fields(model).unwrap();
        let graph = fields(top.iter().find(|f| f.num == MODEL_GRAPH).unwrap().data).unwrap();
        graph
            .iter()
            .filter(|f| f.num == GRAPH_NODE)
            .map(|f| {
                let nf = fields(f.data).unwrap();
                let s = |n| String::from_utf8(strings(&nf, n).first().copied().unwrap_or_default().to_vec()).unwrap();
                (s(NODE_DOMAIN), s(NODE_OP_TYPE))
            })
            .collect()
    }

    #[test]
    fn every_attention_node_of_the_tiny_graph_moves_and_nothing_else_changes() {
        let model = fixture("tiny-qwen2");
        let (edited, n) = reroute(&model).unwrap().expect("the tiny graph has GroupQueryAttention nodes");
        let (before, after) = (ops(&model), ops(&edited));
        assert_eq!(n, before.iter().filter(|(_, op)| op == OP).count());
        assert!(n > 0);
        assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            if b.1 == OP {
                assert_eq!(a, &(DOMAIN.to_string(), OP.to_string()));
            } else {
                assert_eq!(a, b);
            }
        }
        // Idempotent: nothing left to move.
        assert!(reroute(&edited).unwrap().is_none());
    }

    fn gqa_node(window: i64) -> Vec<u8> {
        let mut attr = Vec::new();
        put_bytes(&mut attr, ATTRIBUTE_NAME, b"local_window_size");
        put_int(&mut attr, ATTRIBUTE_INT, window as u64);
        let mut node = Vec::new();
        for i in ["qkv", "", "", "past", "past_v", "seqlens", "total", "cos", "sin", "", ""] {
            put_bytes(&mut node, NODE_INPUT, i.as_bytes());
        }
        put_bytes(&mut node, NODE_OP_TYPE, OP.as_bytes());
        put_bytes(&mut node, NODE_ATTRIBUTE, &attr);
        put_bytes(&mut node, NODE_DOMAIN, b"com.microsoft");
        node
    }

    #[test]
    fn only_nodes_the_kernel_implements_move() {
        let f32_past = HashMap::from([(b"past".to_vec(), 1u64)]);
        let moved = reroute_node(&gqa_node(-1), &f32_past).unwrap().expect("window off: moves");
        let nf = fields(&moved).unwrap();
        assert_eq!(strings(&nf, NODE_DOMAIN), vec![DOMAIN.as_bytes()]);
        assert_eq!(strings(&nf, NODE_INPUT).len(), INPUTS, "trailing empty inputs dropped");
        assert!(reroute_node(&gqa_node(128), &f32_past).unwrap().is_none(), "a local window stays");
        let f16_past = HashMap::from([(b"past".to_vec(), 10u64)]);
        assert!(reroute_node(&gqa_node(-1), &f16_past).unwrap().is_none(), "an fp16 cache stays");
    }
}
