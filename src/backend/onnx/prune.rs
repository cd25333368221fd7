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

/// One protobuf field: its number, wire type and payload (the raw bytes of a varint or fixed
/// value, or the contents of a length-delimited field).
#[derive(Clone, Debug)]
struct Field<'a> {
    num: u64,
    wire: u8,
    data: &'a [u8],
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let (num, wire) = (key >> 3, (key & 7) as u8);
        let start = pos;
        let end = match wire {
            0 => {
                varint(buf, &mut pos)?;
                pos
            }
            1 => pos + 8,
            2 => {
                let len = varint(buf, &mut pos)? as usize;
                let s = pos;
                pos = s.checked_add(len).ok_or("length overflow")?;
                out.push(Field { num, wire, data: buf.get(s..pos).ok_or("truncated field")? });
                continue;
            }
            5 => pos + 4,
            w => return Err(format!("unsupported wire type {w}")),
        };
        out.push(Field { num, wire, data: buf.get(start..end).ok_or("truncated field")? });
        pos = end;
    }
    Ok(out)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, num: u64, data: &[u8]) {
    put_varint(out, (num << 3) | 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

fn put_int(out: &mut Vec<u8>, num: u64, v: u64) {
    put_varint(out, num << 3);
    put_varint(out, v);
}

fn encode(fs: &[Field<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fs {
        put_varint(&mut out, (f.num << 3) | u64::from(f.wire));
        if f.wire == 2 {
            put_varint(&mut out, f.data.len() as u64);
        }
        out.extend_from_slice(f.data);
    }
    out
}

fn strings<'a>(fs: &[Field<'a>], num: u64) -> Vec<&'a [u8]> {
    fs.iter().filter(|f| f.num == num && f.wire == 2).map(|f| f.data).collect()
}

// Field numbers of onnx.proto.
const MODEL_GRAPH: u64 = 7;
const GRAPH_NODE: u64 = 1;
const GRAPH_INITIALIZER: u64 = 5;
const GRAPH_INPUT: u64 = 11;
const GRAPH_OUTPUT: u64 = 12;
const NODE_INPUT: u64 = 1;
const NODE_OUTPUT: u64 = 2;
const NODE_OP_TYPE: u64 = 4;

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
    let gi = match top.iter().enumerate().filter(|(_, f)| f.num == MODEL_GRAPH).map(|(i, _)| i).collect::<Vec<_>>()[..] {
        [i] => i,
        _ => return Err("the model does not have exactly one graph".into()),
    };
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

    let gather = node(&[&hidden, INDEX_INPUT.as_bytes()], GATHERED, "inferd/gather_logits_rows", "GatherND", Some(("batch_dims", 1)));
    let unsqueeze = node(&[GATHERED.as_bytes(), AXES.as_bytes()], UNSQUEEZED, "inferd/unsqueeze_logits_rows", "Unsqueeze", None);
    let axes = int64_tensor(AXES, 1);
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

/// A NodeProto in the default domain, with at most one int attribute.
fn node(inputs: &[&[u8]], output: &str, name: &str, op: &str, attr: Option<(&str, u64)>) -> Vec<u8> {
    let mut out = Vec::new();
    for i in inputs {
        put_bytes(&mut out, NODE_INPUT, i);
    }
    put_bytes(&mut out, NODE_OUTPUT, output.as_bytes());
    put_bytes(&mut out, 3, name.as_bytes());
    put_bytes(&mut out, NODE_OP_TYPE, op.as_bytes());
    if let Some((n, v)) = attr {
        // AttributeProto: name(1), i(3), type(20) = INT(2).
        let mut a = Vec::new();
        put_bytes(&mut a, 1, n.as_bytes());
        put_int(&mut a, 3, v);
        put_int(&mut a, 20, 2);
        put_bytes(&mut out, 5, &a);
    }
    out
}

/// A TensorProto initializer: int64 of shape [1].
fn int64_tensor(name: &str, v: i64) -> Vec<u8> {
    let mut out = Vec::new();
    put_int(&mut out, 1, 1); // dims = [1]
    put_int(&mut out, 2, 7); // data_type = INT64
    put_bytes(&mut out, 8, name.as_bytes());
    put_bytes(&mut out, 9, &v.to_le_bytes()); // raw_data
    out
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

    #[test]
    fn varints_and_fields_round_trip() {
        let mut buf = Vec::new();
        put_int(&mut buf, 3, 300);
        put_bytes(&mut buf, 12, b"logits");
        put_varint(&mut buf, (5 << 3) | 5);
        buf.extend_from_slice(&[1, 2, 3, 4]);
        let fs = fields(&buf).unwrap();
        assert_eq!(fs.len(), 3);
        assert_eq!((fs[0].num, varint(fs[0].data, &mut 0).unwrap()), (3, 300));
        assert_eq!((fs[1].num, fs[1].data), (12, &b"logits"[..]));
        assert_eq!((fs[2].num, fs[2].wire, fs[2].data), (5, 5, &[1u8, 2, 3, 4][..]));
        assert_eq!(encode(&fs), buf, "unchanged fields are written back byte for byte");
        assert!(fields(&buf[..buf.len() - 1]).is_err(), "a truncated message is an error, not a panic");
    }

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
