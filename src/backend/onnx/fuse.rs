//! A load-time edit of the graph: int4 projections that read the same input run as one.
//!
//! The model builder writes an MLP's `gate_proj` and `up_proj` (and, in some exports, `q`, `k`
//! and `v`) as separate `MatMulNBits` nodes on the same activations. [`fuse_shared_input`]
//! merges every such group into one node whose weight rows are the members' rows one after the
//! other, and splits its output back into the members' outputs:
//!
//! ```text
//! x --MatMulNBits(gate)--> g          x --MatMulNBits(gate ++ up, N = Ng + Nu)--> gu
//! x --MatMulNBits(up)----> u    =>    gu --Split(axis -1, [Ng, Nu])--> g, u
//! ```
//!
//! Each output column of `MatMulNBits` is its own weight row's blocks against the input, so the
//! merged node computes exactly the same numbers (checked bit for bit on the tiny int4 fixture
//! and on Qwen2.5-0.5B). What it saves is one kernel dispatch per group and layer: on a 2-core
//! CPU a one-row decode step spends a noticeable part of its time in ONNX Runtime's thread-pool
//! hand-offs, one per node (docs/perf-notes.md, session 7). The merged weights are written into
//! the edited graph in memory (the files stay as they are); ONNX Runtime copies and repacks
//! them when it opens the session, after which the edited bytes are dropped.
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::proto::{
    encode, fields, int64_tensor, node, put_bytes, put_int, strings, varint, Field, ATTRIBUTE_INT, ATTRIBUTE_NAME,
    GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_NODE, MODEL_GRAPH, MODEL_OPSET_IMPORT, NODE_ATTRIBUTE, NODE_DOMAIN, NODE_INPUT,
    NODE_NAME, NODE_OP_TYPE, NODE_OUTPUT, TENSOR_DATA_LOCATION, TENSOR_DATA_TYPE, TENSOR_DIMS, TENSOR_EXTERNAL_DATA,
    TENSOR_NAME, TENSOR_RAW_DATA,
};

/// The result of [`fuse_shared_input`].
pub struct Fused {
    /// The edited model.
    pub bytes: Vec<u8>,
    /// Groups merged, and the nodes they held.
    pub groups: usize,
    pub nodes: usize,
    /// Weight bytes written inline into `bytes`.
    pub inline_bytes: usize,
}

/// `MatMulNBits` inputs that hold one entry (or one row) per output column and are merged by
/// concatenation: B, scales, zero_points, bias. Input 4 (g_idx) is per input row; a node that
/// has one is left alone.
const PER_COLUMN_INPUTS: [usize; 4] = [1, 2, 3, 5];
const G_IDX: usize = 4;

/// One initializer: its field in the graph, shape, element type and where its bytes are.
struct Tensor<'a> {
    dims: Vec<u64>,
    data_type: u64,
    data: Data<'a>,
}

enum Data<'a> {
    Inline(&'a [u8]),
    External { location: String, offset: u64, length: Option<u64> },
    /// Typed fields (`float_data`, ...): not merged.
    Other,
}

fn parse_tensor(buf: &[u8]) -> Result<(Vec<u8>, Tensor<'_>), String> {
    let fs = fields(buf)?;
    let mut dims = Vec::new();
    let (mut data_type, mut raw, mut external, mut name) = (0, None, Vec::new(), Vec::new());
    let mut location_external = false;
    for f in &fs {
        match (f.num, f.wire) {
            (TENSOR_DIMS, 0) => dims.push(varint(f.data, &mut 0)?),
            (TENSOR_DIMS, 2) => {
                let mut pos = 0;
                while pos < f.data.len() {
                    dims.push(varint(f.data, &mut pos)?);
                }
            }
            (TENSOR_DATA_TYPE, 0) => data_type = varint(f.data, &mut 0)?,
            (TENSOR_NAME, 2) => name = f.data.to_vec(),
            (TENSOR_RAW_DATA, 2) => raw = Some(f.data),
            (TENSOR_EXTERNAL_DATA, 2) => {
                let entry = fields(f.data)?;
                let key = strings(&entry, 1).first().copied().unwrap_or_default();
                let value = strings(&entry, 2).first().copied().unwrap_or_default();
                external.push((key, String::from_utf8_lossy(value).into_owned()));
            }
            (TENSOR_DATA_LOCATION, 0) => location_external = varint(f.data, &mut 0)? == 1,
            _ => {}
        }
    }
    let data = if location_external {
        let get = |k: &[u8]| external.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone());
        let number = |k: &[u8]| get(k).map(|v| v.parse::<u64>().map_err(|_| format!("bad external data {}: {v}", String::from_utf8_lossy(k)))).transpose();
        Data::External {
            location: get(b"location").ok_or("external data without a location")?,
            offset: number(b"offset")?.unwrap_or(0),
            length: number(b"length")?,
        }
    } else if let Some(r) = raw {
        Data::Inline(r)
    } else {
        Data::Other
    };
    Ok((name, Tensor { dims, data_type, data }))
}

/// Bytes per element of the element types a `MatMulNBits` input can have.
fn elem_bytes(data_type: u64) -> Option<u64> {
    match data_type {
        2 | 3 => Some(1),    // uint8, int8
        10 | 16 => Some(2),  // float16, bfloat16
        1 | 6 => Some(4),    // float, int32
        7 | 11 => Some(8),   // int64, double
        _ => None,
    }
}

/// Reads a tensor's bytes (external data from files under `dir`, opened once each).
fn tensor_bytes(t: &Tensor<'_>, dir: &Path, files: &mut HashMap<String, File>, out: &mut Vec<u8>) -> Result<(), String> {
    match &t.data {
        Data::Inline(raw) => out.extend_from_slice(raw),
        Data::External { location, offset, length } => {
            let count: u64 = t.dims.iter().product();
            let len = match length {
                Some(l) => *l,
                None => count * elem_bytes(t.data_type).ok_or("external tensor without a length")?,
            };
            let file = match files.entry(location.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let path = dir.join(location);
                    e.insert(File::open(&path).map_err(|err| format!("cannot open {}: {err}", path.display()))?)
                }
            };
            file.seek(SeekFrom::Start(*offset)).map_err(|e| format!("{location}: {e}"))?;
            let start = out.len();
            out.resize(start + len as usize, 0);
            file.read_exact(&mut out[start..]).map_err(|e| format!("{location}: {e}"))?;
        }
        Data::Other => return Err("tensor data in typed fields".into()),
    }
    Ok(())
}

/// One `MatMulNBits` node that may join a group.
struct Candidate<'a> {
    field: usize,
    fields: Vec<Field<'a>>,
    inputs: Vec<&'a [u8]>,
    output: &'a [u8],
    name: &'a [u8],
    n: u64,
}

/// The int attributes of a node, and whether it has any other kind.
fn int_attributes(nf: &[Field<'_>]) -> Result<(Vec<(Vec<u8>, u64)>, bool), String> {
    let mut ints = Vec::new();
    let mut other = false;
    for a in strings(nf, NODE_ATTRIBUTE) {
        let af = fields(a)?;
        let name = strings(&af, ATTRIBUTE_NAME).first().copied().unwrap_or_default().to_vec();
        match af.iter().find(|f| f.num == ATTRIBUTE_INT && f.wire == 0) {
            Some(i) => ints.push((name, varint(i.data, &mut 0)?)),
            None => other = true,
        }
    }
    ints.sort();
    Ok((ints, other))
}

/// The default-domain opset the model imports.
fn default_opset(top: &[Field<'_>]) -> Result<Option<u64>, String> {
    for f in top.iter().filter(|f| f.num == MODEL_OPSET_IMPORT && f.wire == 2) {
        let of = fields(f.data)?;
        let domain = strings(&of, 1).first().copied().unwrap_or_default();
        if domain.is_empty() || domain == b"ai.onnx" {
            return of.iter().find(|f| f.num == 2 && f.wire == 0).map(|f| varint(f.data, &mut 0)).transpose();
        }
    }
    Ok(None)
}

/// `model` (the bytes of a `model.onnx` whose external data lies under `dir`) with every group
/// of two or more `MatMulNBits` nodes that read the same input merged into one, as long as the
/// merged weights written inline stay within `max_inline` bytes. `Ok(None)` when nothing merges.
pub fn fuse_shared_input(model: &[u8], dir: &Path, max_inline: usize) -> Result<Option<Fused>, String> {
    let top = fields(model)?;
    let gi = match top.iter().enumerate().filter(|(_, f)| f.num == MODEL_GRAPH).map(|(i, _)| i).collect::<Vec<_>>()[..] {
        [i] => i,
        _ => return Err("the model does not have exactly one graph".into()),
    };
    // Split takes its sizes as an input from opset 13 on.
    if default_opset(&top)?.is_none_or(|v| v < 13) {
        return Ok(None);
    }
    let graph = fields(top[gi].data)?;

    let graph_inputs: HashSet<&[u8]> = graph
        .iter()
        .filter(|f| f.num == GRAPH_INPUT)
        .filter_map(|f| fields(f.data).ok().and_then(|vi| strings(&vi, 1).first().copied()))
        .collect();
    // Initializers by name (overridable ones, also graph inputs, are not constants).
    let mut inits: HashMap<Vec<u8>, (usize, Tensor<'_>)> = HashMap::new();
    for (i, f) in graph.iter().enumerate().filter(|(_, f)| f.num == GRAPH_INITIALIZER) {
        let (name, t) = parse_tensor(f.data)?;
        if !graph_inputs.contains(&name[..]) {
            inits.insert(name, (i, t));
        }
    }

    // Uses of every value by nodes, and the candidates grouped by (input, attributes but N).
    let mut uses: HashMap<&[u8], usize> = HashMap::new();
    let mut groups: Vec<(Vec<u8>, Vec<Candidate<'_>>)> = Vec::new();
    for (i, f) in graph.iter().enumerate().filter(|(_, f)| f.num == GRAPH_NODE) {
        let nf = fields(f.data)?;
        let inputs = strings(&nf, NODE_INPUT);
        for inp in &inputs {
            *uses.entry(*inp).or_default() += 1;
        }
        let op = strings(&nf, NODE_OP_TYPE).first().copied().unwrap_or_default();
        let domain = strings(&nf, NODE_DOMAIN).first().copied().unwrap_or_default();
        let outputs = strings(&nf, NODE_OUTPUT);
        if op != b"MatMulNBits" || domain != b"com.microsoft" || outputs.len() != 1 || inputs.len() < 3 {
            continue;
        }
        let present = |k: usize| inputs.get(k).is_some_and(|s| !s.is_empty());
        if present(G_IDX) || PER_COLUMN_INPUTS.iter().any(|&k| present(k) && !inits.contains_key(inputs[k])) {
            continue;
        }
        let (ints, other) = int_attributes(&nf)?;
        let Some(n) = ints.iter().find(|(k, _)| k == b"N").map(|(_, v)| *v) else { continue };
        if other {
            continue;
        }
        // The key: the input, which optional inputs are present, every attribute but N.
        let mut key = inputs[0].to_vec();
        for k in PER_COLUMN_INPUTS {
            key.push(b'|');
            key.push(u8::from(present(k)));
        }
        for (name, v) in ints.iter().filter(|(k, _)| k != b"N") {
            key.extend_from_slice(b"|");
            key.extend_from_slice(name);
            key.extend_from_slice(&v.to_le_bytes());
        }
        let name = strings(&nf, NODE_NAME).first().copied().unwrap_or_default();
        let cand = Candidate { field: i, fields: nf, inputs, output: outputs[0], name, n };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(cand),
            None => groups.push((key, vec![cand])),
        }
    }

    let mut files = HashMap::new();
    let mut replaced: HashMap<usize, Vec<Vec<u8>>> = HashMap::new(); // first member's field -> new fields
    let mut dropped: HashSet<usize> = HashSet::new();
    let mut new_inits: Vec<Vec<u8>> = Vec::new();
    let (mut merged_groups, mut merged_nodes, mut inline) = (0, 0, 0usize);
    for (_, members) in groups.iter().filter(|(_, g)| g.len() >= 2) {
        let Some(tensors) = merged_tensors(members, &inits, dir, &mut files, max_inline - inline)? else { continue };
        let first = &members[0];
        let base = format!("inferd/fused/{}", String::from_utf8_lossy(first.name));
        let fused_out = format!("{base}/output");
        let split_sizes = format!("{base}/split");
        let mut inputs: Vec<Vec<u8>> = vec![first.inputs[0].to_vec()];
        for k in 1..first.inputs.len().max(3) {
            let t = tensors.iter().find(|(slot, ..)| *slot == k);
            inputs.push(t.map_or_else(Vec::new, |(_, name, ..)| name.as_bytes().to_vec()));
        }
        while inputs.last().is_some_and(|s| s.is_empty()) {
            inputs.pop();
        }
        let total_n: u64 = members.iter().map(|m| m.n).sum();
        let mut nf: Vec<Field<'_>> = Vec::new();
        let (name_bytes, out_bytes) = (base.clone().into_bytes(), fused_out.clone().into_bytes());
        let n_attr = {
            let mut a = Vec::new();
            put_bytes(&mut a, ATTRIBUTE_NAME, b"N");
            put_int(&mut a, ATTRIBUTE_INT, total_n);
            put_int(&mut a, 20, 2); // type INT
            a
        };
        let mut wrote_inputs = false;
        for f in &first.fields {
            match f.num {
                NODE_INPUT => {
                    if !wrote_inputs {
                        nf.extend(inputs.iter().map(|i| Field { num: NODE_INPUT, wire: 2, data: i }));
                        wrote_inputs = true;
                    }
                }
                NODE_OUTPUT => nf.push(Field { num: NODE_OUTPUT, wire: 2, data: &out_bytes }),
                NODE_NAME => nf.push(Field { num: NODE_NAME, wire: 2, data: &name_bytes }),
                NODE_ATTRIBUTE if fields(f.data)?.iter().any(|a| a.num == ATTRIBUTE_NAME && a.data == b"N") => {
                    nf.push(Field { num: NODE_ATTRIBUTE, wire: 2, data: &n_attr });
                }
                _ => nf.push(f.clone()),
            }
        }
        let sizes: Vec<i64> = members.iter().map(|m| m.n as i64).collect();
        let outputs: Vec<&[u8]> = members.iter().map(|m| m.output).collect();
        let split = node(&[fused_out.as_bytes(), split_sizes.as_bytes()], &outputs, &format!("{base}/split_outputs"), "Split", Some(("axis", -1)));
        replaced.insert(first.field, vec![encode(&nf), split]);
        dropped.extend(members[1..].iter().map(|m| m.field));
        new_inits.push(int64_tensor(&split_sizes, &sizes));
        for (_, _, proto, raw_len) in tensors {
            inline += raw_len;
            new_inits.push(proto);
        }
        // The members' own weights go unless another node still reads them.
        for m in members {
            for &k in &PER_COLUMN_INPUTS {
                if let Some(name) = m.inputs.get(k).filter(|s| !s.is_empty()) {
                    if uses.get(name).copied() == Some(1) {
                        dropped.insert(inits[*name].0);
                    } else if let Some(u) = uses.get_mut(name) {
                        *u -= 1;
                    }
                }
            }
        }
        merged_groups += 1;
        merged_nodes += members.len();
    }
    if merged_groups == 0 {
        return Ok(None);
    }

    let mut out_graph: Vec<Field<'_>> = Vec::with_capacity(graph.len() + new_inits.len());
    for (i, f) in graph.iter().enumerate() {
        if let Some(nodes) = replaced.get(&i) {
            out_graph.extend(nodes.iter().map(|n| Field { num: GRAPH_NODE, wire: 2, data: n }));
        } else if !dropped.contains(&i) {
            out_graph.push(f.clone());
        }
    }
    out_graph.extend(new_inits.iter().map(|t| Field { num: GRAPH_INITIALIZER, wire: 2, data: t }));
    let new_graph = encode(&out_graph);
    drop(out_graph);
    drop(new_inits);
    let mut top = top;
    top[gi].data = &new_graph;
    Ok(Some(Fused { bytes: encode(&top), groups: merged_groups, nodes: merged_nodes, inline_bytes: inline }))
}

/// The merged initializers of a group: (input slot, name, TensorProto bytes, data bytes) per present
/// per-column input, or None when the members' tensors do not line up (element types, inner
/// dimensions, rows per output column) or the bytes would exceed `budget`.
#[allow(clippy::type_complexity)]
fn merged_tensors(
    members: &[Candidate<'_>],
    inits: &HashMap<Vec<u8>, (usize, Tensor<'_>)>,
    dir: &Path,
    files: &mut HashMap<String, File>,
    budget: usize,
) -> Result<Option<Vec<(usize, String, Vec<u8>, usize)>>, String> {
    let first = &members[0];
    // Check shapes first, so that nothing is read for a group that cannot merge.
    let mut plan = Vec::new();
    let mut total = 0u64;
    for &k in PER_COLUMN_INPUTS.iter().filter(|&&k| first.inputs.get(k).is_some_and(|s| !s.is_empty())) {
        let ts: Vec<&Tensor<'_>> = members.iter().map(|m| &inits[m.inputs[k]].1).collect();
        let t0 = ts[0];
        if matches!(t0.data, Data::Other) || t0.dims.is_empty() {
            return Ok(None);
        }
        for (m, t) in members.iter().zip(&ts) {
            let lines_up = t.data_type == t0.data_type && t.dims.len() == t0.dims.len() && t.dims[1..] == t0.dims[1..] && !matches!(t.data, Data::Other);
            // Dimension 0 runs over the output columns: N rows, or N * blocks for flat scales.
            if !lines_up || t.dims[0] % m.n != 0 || t.dims[0] / m.n != t0.dims[0] / first.n {
                return Ok(None);
            }
            let Some(eb) = elem_bytes(t.data_type) else { return Ok(None) };
            total += t.dims.iter().product::<u64>() * eb;
        }
        plan.push((k, ts));
    }
    if total as usize > budget {
        return Ok(None);
    }
    let base = format!("inferd/fused/{}", String::from_utf8_lossy(first.name));
    let mut out = Vec::new();
    for (k, ts) in plan {
        let name = format!("{base}/input_{k}");
        let mut raw = Vec::new();
        for t in &ts {
            tensor_bytes(t, dir, files, &mut raw)?;
        }
        let t0 = ts[0];
        let eb = elem_bytes(t0.data_type).unwrap_or(1);
        let rows: u64 = ts.iter().map(|t| t.dims[0]).sum();
        if raw.len() as u64 != rows * t0.dims[1..].iter().product::<u64>() * eb {
            return Err(format!("{name}: the members' data does not match their shapes"));
        }
        let mut t = Vec::with_capacity(raw.len() + name.len() + 64);
        put_int(&mut t, TENSOR_DIMS, rows);
        for d in &t0.dims[1..] {
            put_int(&mut t, TENSOR_DIMS, *d);
        }
        put_int(&mut t, TENSOR_DATA_TYPE, t0.data_type);
        put_bytes(&mut t, TENSOR_NAME, name.as_bytes());
        put_bytes(&mut t, TENSOR_RAW_DATA, &raw);
        out.push((k, name, t, raw.len()));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx").join(name)
    }

    fn ops(model: &[u8]) -> Vec<String> {
        let top = fields(model).unwrap();
        let graph = fields(top.iter().find(|f| f.num == MODEL_GRAPH).unwrap().data).unwrap();
        graph
            .iter()
            .filter(|f| f.num == GRAPH_NODE)
            .map(|f| String::from_utf8_lossy(strings(&fields(f.data).unwrap(), NODE_OP_TYPE)[0]).into_owned())
            .collect()
    }

    #[test]
    fn gate_and_up_of_each_layer_merge_into_one_node() {
        let dir = fixture("tiny-qwen2-int4");
        let model = std::fs::read(dir.join("model.onnx")).unwrap();
        let fused = fuse_shared_input(&model, &dir, usize::MAX).unwrap().expect("the int4 graph merges");
        assert_eq!((fused.groups, fused.nodes), (2, 4), "gate + up in each of the 2 layers");
        let count = |ops: &[String], op: &str| ops.iter().filter(|o| *o == op).count();
        let (before, after) = (ops(&model), ops(&fused.bytes));
        assert_eq!(count(&after, "MatMulNBits"), count(&before, "MatMulNBits") - 2);
        assert_eq!(count(&after, "Split"), count(&before, "Split") + 2);
        // gate + up weights (int4, 128 x 64) and their f32 scales (2 blocks per row).
        assert_eq!(fused.inline_bytes, 2 * 2 * (128 * 64 / 2 + 128 * 2 * 4));
        assert!(fuse_shared_input(&fused.bytes, &dir, usize::MAX).unwrap().is_none(), "nothing left to merge");
        assert!(fuse_shared_input(&model, &dir, 1000).unwrap().is_none(), "over the inline budget");
    }

    #[test]
    fn a_float_graph_is_left_alone() {
        let dir = fixture("tiny-qwen2");
        let model = std::fs::read(dir.join("model.onnx")).unwrap();
        assert!(fuse_shared_input(&model, &dir, usize::MAX).unwrap().is_none());
    }
}
