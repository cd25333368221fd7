//! A load-time edit of the graph: logits only at the positions the server samples.
//!
//! The model builder's graphs (without `--prune-lm-head`) project every input position onto
//! the vocabulary. A prompt of 41 tokens on Qwen2.5-0.5B thus spends about a quarter of its
//! prefill in the `lm_head` for logits nobody reads, and a 512-token chunk writes 311 MB of
//! logits per row. [`logits_at_index`] rewrites the graph (in memory; the files stay as they
//! are) so that the projection reads one position per row, chosen by a new input:
//!
//! ```text
//! hidden [b, s, h] --GatherND(batch_dims=1, inferd_logits_index [b, 1])--> [b, h]
//!                  --Unsqueeze(1)--> [b, 1, h] --lm_head ...--> logits [b, 1, vocab]
//! ```
//!
//! The index is each row's last real position in the step (rows are right-padded), so rows of
//! different lengths still prefill in one `Run`. The edit works on the protobuf wire format
//! directly: every field it does not touch is copied byte for byte.
use std::collections::HashMap;

use super::proto::{encode, fields, graph_field, int64_tensor, node, put_bytes, put_int, strings, varint, Field, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_NODE, GRAPH_OUTPUT, NODE_INPUT, NODE_OP_TYPE, NODE_OUTPUT};

/// Name of the added graph input: `[batch, 1]` int64, the position whose logits each row gets.
pub const INDEX_INPUT: &str = "inferd_logits_index";

const GATHERED: &str = "inferd/last_hidden_2d";
const UNSQUEEZED: &str = "inferd/last_hidden";
const AXES: &str = "inferd/axis_1";

/// Ops that act on each position alone and may sit between the vocabulary projection and the
/// logits output (an fp16 graph casts its logits, some models add a bias or scale them).
const PER_POSITION: [&str; 5] = ["Cast", "Add", "Mul", "Div", "Identity"];
/// Ops that can be the vocabulary projection.
const PROJECTION: [&str; 4] = ["MatMul", "MatMulNBits", "Gemm", "MatMulInteger"];

/// A node of the graph: its index among the graph's fields, inputs, outputs and op type.
struct Node<'a> {
    field: usize,
    inputs: Vec<&'a [u8]>,
    outputs: Vec<&'a [u8]>,
    op: &'a [u8],
}

/// Whether the graph output `logits` already has one position per row (`--prune-lm-head`).
fn already_one_position(graph: &[Field<'_>], logits: &[u8]) -> Result<bool, String> {
    for f in graph.iter().filter(|f| f.num == GRAPH_OUTPUT) {
        let vi = fields(f.data)?;
        if strings(&vi, 1).first() != Some(&logits) {
            continue;
        }
        // ValueInfoProto.type(2) -> TypeProto.tensor_type(1) -> shape(2) -> dim(1)[1] -> dim_value(1)
        let dim1 = (|| -> Result<Option<u64>, String> {
            let Some(ty) = strings(&vi, 2).first().copied() else { return Ok(None) };
            let Some(tensor) = strings(&fields(ty)?, 1).first().copied() else { return Ok(None) };
            let Some(shape) = strings(&fields(tensor)?, 2).first().copied() else { return Ok(None) };
            let dims = strings(&fields(shape)?, 1);
            let Some(d) = dims.get(1) else { return Ok(None) };
            let d = fields(d)?;
            d.iter().find(|f| f.num == 1 && f.wire == 0).map(|f| varint(f.data, &mut 0)).transpose()
        })()?;
        return Ok(dim1 == Some(1));
    }
    Err(format!("the graph has no output '{}'", String::from_utf8_lossy(logits)))
}

/// `model` (the bytes of a `model.onnx`) with the vocabulary projection reading one position
/// per row, chosen by the new input [`INDEX_INPUT`]. `Ok(None)` when the graph already returns
/// one position, already has the input, or its logits do not come from a projection this edit
/// recognises (the graph is then used as it is).
pub fn logits_at_index(model: &[u8], logits: &str) -> Result<Option<Vec<u8>>, String> {
    let top = fields(model)?;
    let gi = graph_field(&top)?;
    let mut graph = fields(top[gi].data)?;
    let logits = logits.as_bytes();
    if already_one_position(&graph, logits)? {
        return Ok(None);
    }
    if graph.iter().filter(|f| f.num == GRAPH_INPUT).any(|f| fields(f.data).is_ok_and(|vi| strings(&vi, 1).first() == Some(&INDEX_INPUT.as_bytes()))) {
        return Ok(None);
    }
    let mut nodes = Vec::new();
    for (i, f) in graph.iter().enumerate().filter(|(_, f)| f.num == GRAPH_NODE) {
        let nf = fields(f.data)?;
        let op = strings(&nf, NODE_OP_TYPE).first().copied().unwrap_or_default();
        nodes.push(Node { field: i, inputs: strings(&nf, NODE_INPUT), outputs: strings(&nf, NODE_OUTPUT), op });
    }
    let producer: HashMap<&[u8], usize> = nodes.iter().enumerate().flat_map(|(n, node)| node.outputs.iter().map(move |o| (*o, n))).collect();
    // Walk back from the logits through per-position ops to the projection.
    let mut at = logits;
    let proj = loop {
        let Some(&n) = producer.get(at) else { return Ok(None) };
        let node = &nodes[n];
        let op = std::str::from_utf8(node.op).unwrap_or_default();
        if PROJECTION.contains(&op) {
            break n;
        }
        if !PER_POSITION.contains(&op) {
            return Ok(None);
        }
        // Follow the input that carries the positions (the first one not a constant).
        match node.inputs.iter().find(|i| producer.contains_key(*i)) {
            Some(i) => at = i,
            None => return Ok(None),
        }
    };
    let hidden = nodes[proj].inputs.first().copied().ok_or("the vocabulary projection has no input")?.to_vec();

    // The projection now reads the gathered rows.
    let pf = graph[nodes[proj].field].clone();
    let mut node_fields = fields(pf.data)?;
    let first_input = node_fields.iter().position(|f| f.num == NODE_INPUT).ok_or("projection without inputs")?;
    node_fields[first_input].data = UNSQUEEZED.as_bytes();
    let new_proj = encode(&node_fields);
    graph[nodes[proj].field] = Field { num: GRAPH_NODE, wire: 2, data: &new_proj };

    let gather = node(&[&hidden, INDEX_INPUT.as_bytes()], &[GATHERED.as_bytes()], "inferd/gather_logits_rows", "GatherND", Some(("batch_dims", 1)));
    let unsqueeze = node(&[GATHERED.as_bytes(), AXES.as_bytes()], &[UNSQUEEZED.as_bytes()], "inferd/unsqueeze_logits_rows", "Unsqueeze", None);
    let axes = int64_tensor(AXES, &[1]);
    let input = index_input();
    // Nodes need not be in order in the file: ONNX Runtime sorts the graph when it loads it.
    graph.push(Field { num: GRAPH_NODE, wire: 2, data: &gather });
    graph.push(Field { num: GRAPH_NODE, wire: 2, data: &unsqueeze });
    graph.push(Field { num: GRAPH_INITIALIZER, wire: 2, data: &axes });
    graph.push(Field { num: GRAPH_INPUT, wire: 2, data: &input });
    let new_graph = encode(&graph);
    let mut top = top;
    top[gi].data = &new_graph;
    Ok(Some(encode(&top)))
}

/// The ValueInfoProto of [`INDEX_INPUT`]: int64 `[batch_size, 1]`.
fn index_input() -> Vec<u8> {
    let (mut batch, mut one, mut shape, mut tensor, mut ty, mut vi) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    put_bytes(&mut batch, 2, b"batch_size"); // Dimension.dim_param
    put_int(&mut one, 1, 1); // Dimension.dim_value
    put_bytes(&mut shape, 1, &batch);
    put_bytes(&mut shape, 1, &one);
    put_int(&mut tensor, 1, 7); // TypeProto.Tensor.elem_type = INT64
    put_bytes(&mut tensor, 2, &shape);
    put_bytes(&mut ty, 1, &tensor); // TypeProto.tensor_type
    put_bytes(&mut vi, 1, INDEX_INPUT.as_bytes());
    put_bytes(&mut vi, 2, &ty);
    vi
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::onnx::proto::MODEL_GRAPH;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx").join(name).join("model.onnx")).unwrap()
    }

    #[test]
    fn the_tiny_graph_gets_the_index_input_and_keeps_everything_else() {
        let model = fixture("tiny-qwen2");
        let edited = logits_at_index(&model, "logits").unwrap().expect("the tiny graph is edited");
        let graph = |m: &[u8]| fields(m).unwrap().into_iter().find(|f| f.num == MODEL_GRAPH).unwrap().data.to_vec();
        let (before, after) = (graph(&model), graph(&edited));
        let count = |g: &[u8], num| fields(g).unwrap().iter().filter(|f| f.num == num).count();
        assert_eq!(count(&after, GRAPH_NODE), count(&before, GRAPH_NODE) + 2);
        assert_eq!(count(&after, GRAPH_INPUT), count(&before, GRAPH_INPUT) + 1);
        assert_eq!(count(&after, GRAPH_INITIALIZER), count(&before, GRAPH_INITIALIZER) + 1);
        assert_eq!(logits_at_index(&edited, "logits").unwrap(), None, "a second edit changes nothing");
        assert!(logits_at_index(&model, "no_such_output").is_err());
    }

    #[test]
    fn a_graph_pruned_by_the_builder_is_left_alone() {
        let model = fixture("tiny-qwen2-pruned");
        assert_eq!(logits_at_index(&model, "logits").unwrap(), None);
    }
}
