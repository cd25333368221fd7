//! A load-time edit of the graph: nodes that inferd has its own CPU kernel for move from the
//! `com.microsoft` domain to [`DOMAIN`] (inputs, outputs and attributes stay; trailing empty
//! inputs go) and the model imports that domain. The kernels:
//! - `GroupQueryAttention` ([`super::gqa`]), unless the node uses something the kernel does not
//!   implement: a local window, softcap, smooth softmax, the QK output, inputs after `sin_cache`
//!   (position ids, attention bias, head sinks) or a past cache that is not f32;
//! - `MatMulNBits` ([`super::nbits`], x86-64 with AVX2 and FMA) at 4 bits, blocks of 32,
//!   `accuracy_level` 4, with f32 scales and no zero points, group index or bias;
//! - the standard `MatMul`s of the LoRA branches (second input a LoRA weight,
//!   `*.lora_A.MatMul.weight` / `*.lora_B.MatMul.weight`, f32) onto [`super::lora_matmul`].
use std::collections::HashMap;

use ort::operator::OperatorDomain;

use super::proto::{encode, fields, graph_field, put_bytes, put_int, strings, varint, Field, ATTRIBUTE_FLOAT, ATTRIBUTE_INT, ATTRIBUTE_NAME, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_NODE, MODEL_OPSET_IMPORT, NODE_ATTRIBUTE, NODE_DOMAIN, NODE_INPUT, NODE_OP_TYPE, TENSOR_DATA_TYPE, TENSOR_NAME};
use super::{gqa, lora_matmul};

/// The custom op domain of inferd's kernels.
pub const DOMAIN: &str = "ai.inferd";

/// The operator domain to register on a session whose graph went through [`reroute`].
pub fn domain() -> ort::Result<OperatorDomain> {
    let domain = OperatorDomain::new(DOMAIN)?.add(gqa::GqaOp)?.add(lora_matmul::LoraMatMulOp)?;
    #[cfg(target_arch = "x86_64")]
    let domain = domain.add(super::nbits::NBitsOp)?;
    Ok(domain)
}

/// The name of ONNX Runtime's int4 matmul and of inferd's kernel for it ([`super::nbits`]).
pub const MATMUL_OP: &str = "MatMulNBits";

/// Whether this CPU runs inferd's int4 matmul kernel (AVX2 and FMA on x86-64).
pub fn matmul_kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::nbits::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Which kernels a [`reroute`] may move nodes onto.
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    pub attention: bool,
    pub matmul: bool,
    pub lora: bool,
}

/// How many nodes a [`reroute`] moved, per kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moved {
    pub attention: usize,
    pub matmul: usize,
    pub lora: usize,
}

/// Attributes the attention kernel reads; any other makes the node stay on ONNX Runtime's kernel
/// unless it has the value that means "off".
const ATTENTION_ATTRIBUTES: [&str; 5] = ["num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved"];
/// Inputs the attention kernel takes: query, key, value, past key, past value, seqlens_k,
/// total_sequence_length, cos_cache, sin_cache.
const ATTENTION_INPUTS: usize = 9;
/// Inputs the matmul kernel takes: A, B, scales.
const MATMUL_INPUTS: usize = 3;

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

/// The element type of each graph input and initializer (TensorProto.DataType; 1 = FLOAT).
fn value_types(graph: &[Field<'_>]) -> Result<HashMap<Vec<u8>, u64>, String> {
    let mut out = HashMap::new();
    for f in graph.iter().filter(|f| f.num == GRAPH_INITIALIZER) {
        let t = fields(f.data)?;
        let name = strings(&t, TENSOR_NAME).first().copied().unwrap_or_default().to_vec();
        if let Some(ty) = t.iter().find(|f| f.num == TENSOR_DATA_TYPE && f.wire == 0) {
            out.insert(name, varint(ty.data, &mut 0)?);
        }
    }
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

/// Which kernel takes a node (its fields), and how many of its inputs it keeps; None when
/// neither supports it.
fn kernel_for(nf: &[Field<'_>], types: &HashMap<Vec<u8>, u64>, kernels: Kernels) -> Result<Option<(&'static str, usize)>, String> {
    let op = strings(nf, NODE_OP_TYPE).first().copied().unwrap_or_default();
    let inputs = strings(nf, NODE_INPUT);
    let domain = strings(nf, NODE_DOMAIN).first().copied().unwrap_or_default();
    if kernels.lora && op == b"MatMul" && (domain.is_empty() || domain == b"ai.onnx") {
        // The LoRA weights are f32 graph inputs named by the export (scripts/export_onnx.py).
        let lora_weight = inputs.get(1).is_some_and(|w| (w.ends_with(b".lora_A.MatMul.weight") || w.ends_with(b".lora_B.MatMul.weight")) && types.get(*w) == Some(&1));
        return Ok((lora_weight && inputs.len() == 2).then_some((lora_matmul::OP, 2)));
    }
    if domain != b"com.microsoft" {
        return Ok(None);
    }
    let attributes = strings(nf, NODE_ATTRIBUTE).into_iter().map(attribute).collect::<Result<Vec<_>, _>>()?;
    if kernels.attention && op == gqa::OP.as_bytes() {
        let known = |name: &[u8], value: &Value| ATTENTION_ATTRIBUTES.iter().any(|n| n.as_bytes() == name) || off(name, value);
        // The past cache must be an f32 graph input (the server's KV buffers).
        let f32_past = inputs.get(3).is_some_and(|past| types.get(*past) == Some(&1));
        let supported = attributes.iter().all(|(n, v)| known(n, v)) && inputs.iter().skip(ATTENTION_INPUTS).all(|i| i.is_empty()) && f32_past;
        return Ok(supported.then_some((gqa::OP, ATTENTION_INPUTS)));
    }
    if kernels.matmul && op == MATMUL_OP.as_bytes() {
        let fits = |name: &[u8], value: &Value| match name {
            b"bits" => *value == Value::Int(4),
            b"block_size" => *value == Value::Int(32),
            b"accuracy_level" => *value == Value::Int(4),
            b"K" | b"N" => matches!(value, Value::Int(v) if *v > 0),
            _ => false,
        };
        // `bits` defaults to 4; `accuracy_level` to 0 (fp32 compute, not this kernel's).
        let given = |name: &[u8]| attributes.iter().any(|(n, _)| n.as_slice() == name);
        let level = [&b"K"[..], b"N", b"block_size", b"accuracy_level"].into_iter().all(given);
        // Scales in f32 (the activations' type too); no zero points, group index or bias.
        let f32_scales = inputs.get(2).is_some_and(|s| types.get(*s) == Some(&1));
        let supported = level && attributes.iter().all(|(n, v)| fits(n, v)) && inputs.len() >= MATMUL_INPUTS && inputs.iter().skip(MATMUL_INPUTS).all(|i| i.is_empty()) && f32_scales;
        return Ok(supported.then_some((MATMUL_OP, MATMUL_INPUTS)));
    }
    Ok(None)
}

/// The node (its NodeProto bytes) moved to [`DOMAIN`] as operator `op` with its first `keep`
/// inputs (a node of the default domain has no domain field: one is added).
fn moved_node(nf: &[Field<'_>], op: &str, keep: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut seen_inputs = 0;
    for f in nf.iter() {
        if f.num == NODE_INPUT {
            seen_inputs += 1;
            if seen_inputs > keep {
                continue;
            }
        }
        match f.num {
            NODE_DOMAIN => continue,
            NODE_OP_TYPE => put_bytes(&mut out, NODE_OP_TYPE, op.as_bytes()),
            _ => out.extend_from_slice(&encode(std::slice::from_ref(f))),
        }
    }
    put_bytes(&mut out, NODE_DOMAIN, DOMAIN.as_bytes());
    out
}

/// `model` (the bytes of a `model.onnx`, possibly already edited) with every node that one of
/// `kernels` supports on [`DOMAIN`], and how many moved; `Ok(None)` when none did.
pub fn reroute(model: &[u8], kernels: Kernels) -> Result<Option<(Vec<u8>, Moved)>, String> {
    let top = fields(model)?;
    let gi = graph_field(&top)?;
    let graph = fields(top[gi].data)?;
    let types = value_types(&graph)?;
    let mut rerouted: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut moved = Moved::default();
    for (i, f) in graph.iter().enumerate().filter(|(_, f)| f.num == GRAPH_NODE) {
        let nf = fields(f.data)?;
        if let Some((op, keep)) = kernel_for(&nf, &types, kernels)? {
            *match op {
                gqa::OP => &mut moved.attention,
                lora_matmul::OP => &mut moved.lora,
                _ => &mut moved.matmul,
            } += 1;
            rerouted.push((i, moved_node(&nf, op, keep)));
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
    Ok(Some((encode(&top), moved)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::onnx::proto::MODEL_GRAPH;

    const ALL: Kernels = Kernels { attention: true, matmul: true, lora: true };

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
        let (edited, moved) = reroute(&model, ALL).unwrap().expect("the tiny graph has GroupQueryAttention nodes");
        let n = moved.attention;
        assert_eq!(moved.matmul, 0, "the tiny graph is fp32");
        let (before, after) = (ops(&model), ops(&edited));
        assert_eq!(n, before.iter().filter(|(_, op)| op == gqa::OP).count());
        assert!(n > 0);
        assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            if b.1 == gqa::OP {
                assert_eq!(a, &(DOMAIN.to_string(), gqa::OP.to_string()));
            } else {
                assert_eq!(a, b);
            }
        }
        // Idempotent: nothing left to move.
        assert!(reroute(&edited, ALL).unwrap().is_none());
    }

    fn gqa_node(window: i64) -> Vec<u8> {
        let mut attr = Vec::new();
        put_bytes(&mut attr, ATTRIBUTE_NAME, b"local_window_size");
        put_int(&mut attr, ATTRIBUTE_INT, window as u64);
        let mut node = Vec::new();
        for i in ["qkv", "", "", "past", "past_v", "seqlens", "total", "cos", "sin", "", ""] {
            put_bytes(&mut node, NODE_INPUT, i.as_bytes());
        }
        put_bytes(&mut node, NODE_OP_TYPE, gqa::OP.as_bytes());
        put_bytes(&mut node, NODE_ATTRIBUTE, &attr);
        put_bytes(&mut node, NODE_DOMAIN, b"com.microsoft");
        node
    }

    /// Where the node goes: the kernel and the kept inputs, or None.
    fn route(node: &[u8], types: &HashMap<Vec<u8>, u64>) -> Option<(&'static str, Vec<u8>)> {
        let nf = fields(node).unwrap();
        kernel_for(&nf, types, ALL).unwrap().map(|(op, keep)| (op, moved_node(&nf, op, keep)))
    }

    #[test]
    fn only_attention_nodes_the_kernel_implements_move() {
        let f32_past = HashMap::from([(b"past".to_vec(), 1u64)]);
        let (op, moved) = route(&gqa_node(-1), &f32_past).expect("window off: moves");
        assert_eq!(op, gqa::OP);
        let nf = fields(&moved).unwrap();
        assert_eq!(strings(&nf, NODE_DOMAIN), vec![DOMAIN.as_bytes()]);
        assert_eq!(strings(&nf, NODE_INPUT).len(), ATTENTION_INPUTS, "trailing empty inputs dropped");
        assert!(route(&gqa_node(128), &f32_past).is_none(), "a local window stays");
        let f16_past = HashMap::from([(b"past".to_vec(), 10u64)]);
        assert!(route(&gqa_node(-1), &f16_past).is_none(), "an fp16 cache stays");
        let kernels = Kernels { attention: false, matmul: true, lora: true };
        assert!(kernel_for(&fields(&gqa_node(-1)).unwrap(), &f32_past, kernels).unwrap().is_none(), "attention not asked for");
    }

    fn matmul_node(inputs: &[&str], attrs: &[(&str, i64)]) -> Vec<u8> {
        let mut node = Vec::new();
        for i in inputs {
            put_bytes(&mut node, NODE_INPUT, i.as_bytes());
        }
        put_bytes(&mut node, NODE_OP_TYPE, MATMUL_OP.as_bytes());
        for (name, v) in attrs {
            let mut attr = Vec::new();
            put_bytes(&mut attr, ATTRIBUTE_NAME, name.as_bytes());
            put_int(&mut attr, ATTRIBUTE_INT, *v as u64);
            put_bytes(&mut node, NODE_ATTRIBUTE, &attr);
        }
        put_bytes(&mut node, NODE_DOMAIN, b"com.microsoft");
        node
    }

    #[test]
    fn only_matmul_nodes_the_kernel_implements_move() {
        let attrs = [("K", 896), ("N", 1152), ("accuracy_level", 4), ("bits", 4), ("block_size", 32)];
        let f32_scales = HashMap::from([(b"s".to_vec(), 1u64)]);
        let (op, moved) = route(&matmul_node(&["a", "b", "s", "", ""], &attrs), &f32_scales).expect("the exported int4 node moves");
        assert_eq!(op, MATMUL_OP);
        let nf = fields(&moved).unwrap();
        assert_eq!(strings(&nf, NODE_DOMAIN), vec![DOMAIN.as_bytes()]);
        assert_eq!(strings(&nf, NODE_INPUT), vec![&b"a"[..], b"b", b"s"]);
        let with = |name: &str, v: i64| attrs.iter().map(|&(n, x)| (n, if n == name { v } else { x })).collect::<Vec<_>>();
        for (name, v, why) in [("accuracy_level", 0, "fp32 compute"), ("block_size", 128, "another block size"), ("bits", 8, "8 bits")] {
            assert!(route(&matmul_node(&["a", "b", "s"], &with(name, v)), &f32_scales).is_none(), "{why} stays");
        }
        assert!(route(&matmul_node(&["a", "b", "s"], &attrs[..4]), &f32_scales).is_none(), "no block size stays");
        assert!(route(&matmul_node(&["a", "b", "s", "zp"], &attrs), &f32_scales).is_none(), "zero points stay");
        assert!(route(&matmul_node(&["a", "b", "s", "", "", "bias"], &attrs), &f32_scales).is_none(), "a bias stays");
        let f16_scales = HashMap::from([(b"s".to_vec(), 10u64)]);
        assert!(route(&matmul_node(&["a", "b", "s"], &attrs), &f16_scales).is_none(), "fp16 scales stay");
        assert!(kernel_for(&fields(&matmul_node(&["a", "b", "s"], &attrs)).unwrap(), &f32_scales, Kernels { attention: true, matmul: false, lora: true }).unwrap().is_none());
    }

    #[test]
    fn the_lora_branch_matmuls_move_to_the_lora_kernel_and_other_matmuls_stay() {
        let node = |inputs: &[&str]| {
            let mut node = Vec::new();
            for i in inputs {
                put_bytes(&mut node, NODE_INPUT, i.as_bytes());
            }
            put_bytes(&mut node, NODE_OP_TYPE, b"MatMul");
            node
        };
        let a = "model.layers.0.attn.q_proj.lora_A.MatMul.weight";
        let b = "model.layers.0.mlp.down_proj.lora_B.MatMul.weight";
        let types = HashMap::from([(a.as_bytes().to_vec(), 1u64), (b.as_bytes().to_vec(), 1u64), (b"w".to_vec(), 1u64), (b"h".to_vec(), 10u64)]);
        for w in [a, b] {
            let (op, moved) = route(&node(&["x", w]), &types).expect("a LoRA matmul moves");
            assert_eq!(op, lora_matmul::OP);
            let nf = fields(&moved).unwrap();
            assert_eq!(strings(&nf, NODE_DOMAIN), vec![DOMAIN.as_bytes()], "the default domain becomes inferd's");
            assert_eq!(strings(&nf, NODE_OP_TYPE), vec![lora_matmul::OP.as_bytes()]);
            assert_eq!(strings(&nf, NODE_INPUT), vec![&b"x"[..], w.as_bytes()]);
        }
        assert!(route(&node(&["x", "w"]), &types).is_none(), "a base matmul stays on ONNX Runtime's kernel");
        let f16 = HashMap::from([(a.as_bytes().to_vec(), 10u64)]);
        assert!(route(&node(&["x", a]), &f16).is_none(), "an fp16 LoRA weight stays");
        let off = Kernels { attention: true, matmul: true, lora: false };
        assert!(kernel_for(&fields(&node(&["x", a])).unwrap(), &types, off).unwrap().is_none(), "the LoRA kernel not asked for");
    }
}
