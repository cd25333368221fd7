//! A load-time edit of the graph: each gated MLP activation, `Sigmoid(g)` -> `Mul(g, ·)` ->
//! `Mul(·, u)`, becomes one [`silu_mul`](super::silu_mul) node `SiluMul(g, u)` on inferd's CPU
//! kernel. The pattern is taken only when the two intermediate values feed nothing else and are
//! not graph outputs; everything else in the graph is copied byte for byte.
use std::collections::HashMap;

use super::gqa::DOMAIN;
use super::proto::{encode, fields, put_bytes, strings, Field, GRAPH_NODE, GRAPH_OUTPUT, MODEL_GRAPH, MODEL_OPSET_IMPORT, NODE_DOMAIN, NODE_INPUT, NODE_NAME, NODE_OP_TYPE, NODE_OUTPUT};
use super::silu_mul::OP;

struct Node<'a> {
    field: usize,
    op: &'a [u8],
    domain: &'a [u8],
    inputs: Vec<&'a [u8]>,
    outputs: Vec<&'a [u8]>,
    name: &'a [u8],
}

/// `model` with every `Sigmoid` -> `Mul` -> `Mul` activation replaced by one `SiluMul` node, and
/// the number replaced; `Ok(None)` when there is none.
pub fn fuse(model: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let top = fields(model)?;
    let gi = match top.iter().enumerate().filter(|(_, f)| f.num == MODEL_GRAPH).map(|(i, _)| i).collect::<Vec<_>>()[..] {
        [i] => i,
        _ => return Err("the model does not have exactly one graph".into()),
    };
    let graph = fields(top[gi].data)?;
    let mut nodes = Vec::new();
    for (i, f) in graph.iter().enumerate().filter(|(_, f)| f.num == GRAPH_NODE) {
        let nf = fields(f.data)?;
        let first = |n| strings(&nf, n).first().copied().unwrap_or_default();
        nodes.push(Node { field: i, op: first(NODE_OP_TYPE), domain: first(NODE_DOMAIN), name: first(NODE_NAME), inputs: strings(&nf, NODE_INPUT), outputs: strings(&nf, NODE_OUTPUT) });
    }
    let mut consumers: HashMap<&[u8], Vec<usize>> = HashMap::new();
    for (n, node) in nodes.iter().enumerate() {
        for i in &node.inputs {
            consumers.entry(*i).or_default().push(n);
        }
    }
    let outputs: Vec<&[u8]> = graph.iter().filter(|f| f.num == GRAPH_OUTPUT).filter_map(|f| fields(f.data).ok().and_then(|vi| strings(&vi, 1).first().copied())).collect();
    // The one consumer of `value` when it is a plain `Mul` and `value` is no graph output.
    let only_mul = |value: &[u8]| -> Option<usize> {
        match consumers.get(value).map(Vec::as_slice) {
            Some(&[c]) if nodes[c].op == b"Mul" && nodes[c].domain.is_empty() && nodes[c].inputs.len() == 2 && !outputs.contains(&value) => Some(c),
            _ => None,
        }
    };
    // (sigmoid, first mul, second mul, gate, up)
    let mut found = Vec::new();
    for (s, node) in nodes.iter().enumerate() {
        if node.op != b"Sigmoid" || !node.domain.is_empty() || node.inputs.len() != 1 || node.outputs.len() != 1 {
            continue;
        }
        let (gate, sig) = (node.inputs[0], node.outputs[0]);
        let Some(m1) = only_mul(sig) else { continue };
        if !(nodes[m1].inputs.contains(&gate) && nodes[m1].inputs.contains(&sig)) || nodes[m1].outputs.len() != 1 {
            continue;
        }
        let Some(m2) = only_mul(nodes[m1].outputs[0]) else { continue };
        let act = nodes[m1].outputs[0];
        let up = if nodes[m2].inputs[0] == act { nodes[m2].inputs[1] } else { nodes[m2].inputs[0] };
        if up == act || nodes[m2].outputs.len() != 1 {
            continue;
        }
        found.push((s, m1, m2, gate, up));
    }
    if found.is_empty() {
        return Ok(None);
    }
    let mut replaced: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut dropped = Vec::new();
    for &(s, m1, m2, gate, up) in &found {
        let mut node = Vec::new();
        put_bytes(&mut node, NODE_INPUT, gate);
        put_bytes(&mut node, NODE_INPUT, up);
        put_bytes(&mut node, NODE_OUTPUT, nodes[m2].outputs[0]);
        put_bytes(&mut node, NODE_NAME, &[nodes[m2].name, b"/inferd_silu_mul"].concat());
        put_bytes(&mut node, NODE_OP_TYPE, OP.as_bytes());
        put_bytes(&mut node, NODE_DOMAIN, DOMAIN.as_bytes());
        replaced.insert(nodes[m2].field, node);
        dropped.push(nodes[s].field);
        dropped.push(nodes[m1].field);
    }
    let mut out_graph: Vec<Field<'_>> = Vec::with_capacity(graph.len());
    for (i, f) in graph.iter().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        match replaced.get(&i) {
            Some(node) => out_graph.push(Field { num: GRAPH_NODE, wire: 2, data: node }),
            None => out_graph.push(f.clone()),
        }
    }
    let new_graph = encode(&out_graph);
    let mut top = top;
    top[gi].data = &new_graph;
    let mut opset = Vec::new();
    put_bytes(&mut opset, 1, DOMAIN.as_bytes());
    super::proto::put_int(&mut opset, 2, 1);
    let has_domain = top.iter().filter(|f| f.num == MODEL_OPSET_IMPORT).any(|f| fields(f.data).is_ok_and(|o| strings(&o, 1).first().copied() == Some(DOMAIN.as_bytes())));
    if !has_domain {
        top.push(Field { num: MODEL_OPSET_IMPORT, wire: 2, data: &opset });
    }
    Ok(Some((encode(&top), found.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op_counts(model: &[u8]) -> HashMap<String, usize> {
        let top = fields(model).unwrap();
        let graph = fields(top.iter().find(|f| f.num == MODEL_GRAPH).unwrap().data).unwrap();
        let mut out = HashMap::new();
        for f in graph.iter().filter(|f| f.num == GRAPH_NODE) {
            let nf = fields(f.data).unwrap();
            *out.entry(String::from_utf8(strings(&nf, NODE_OP_TYPE)[0].to_vec()).unwrap()).or_default() += 1;
        }
        out
    }

    #[test]
    fn each_mlp_activation_of_the_tiny_graph_becomes_one_node() {
        let model = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/tiny-qwen2/model.onnx")).unwrap();
        let before = op_counts(&model);
        let (edited, n) = fuse(&model).unwrap().expect("the tiny graph has gated MLPs");
        let after = op_counts(&edited);
        assert_eq!(n, before["Sigmoid"]);
        assert_eq!(after.get("Sigmoid"), None);
        assert_eq!(after[OP], n);
        assert_eq!(after.get("Mul").copied().unwrap_or(0), before["Mul"] - 2 * n);
        assert!(fuse(&edited).unwrap().is_none(), "nothing left to fuse");
    }
}
