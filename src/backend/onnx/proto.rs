//! The protobuf wire format of ONNX files, as much as the load-time graph edits need
//! ([`super::prune`], [`super::op_edit`]): a message is a list of fields, and every field an edit
//! does not touch is written back byte for byte.

/// One protobuf field: its number, wire type and payload (the raw bytes of a varint or fixed
/// value, or the contents of a length-delimited field).
#[derive(Clone, Debug)]
pub struct Field<'a> {
    pub num: u64,
    pub wire: u8,
    pub data: &'a [u8],
}

pub fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
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

pub fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
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

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn put_bytes(out: &mut Vec<u8>, num: u64, data: &[u8]) {
    put_varint(out, (num << 3) | 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

pub fn put_int(out: &mut Vec<u8>, num: u64, v: u64) {
    put_varint(out, num << 3);
    put_varint(out, v);
}

pub fn encode(fs: &[Field<'_>]) -> Vec<u8> {
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

pub fn strings<'a>(fs: &[Field<'a>], num: u64) -> Vec<&'a [u8]> {
    fs.iter().filter(|f| f.num == num && f.wire == 2).map(|f| f.data).collect()
}

/// The index among a ModelProto's fields of its one graph.
pub fn graph_field(model: &[Field<'_>]) -> Result<usize, String> {
    match model.iter().enumerate().filter(|(_, f)| f.num == MODEL_GRAPH).map(|(i, _)| i).collect::<Vec<_>>()[..] {
        [i] => Ok(i),
        _ => Err("the model does not have exactly one graph".into()),
    }
}

// Field numbers of onnx.proto.
pub const MODEL_GRAPH: u64 = 7;
pub const GRAPH_NODE: u64 = 1;
pub const GRAPH_INITIALIZER: u64 = 5;
pub const GRAPH_INPUT: u64 = 11;
pub const GRAPH_OUTPUT: u64 = 12;
pub const NODE_INPUT: u64 = 1;
pub const NODE_OUTPUT: u64 = 2;
pub const NODE_OP_TYPE: u64 = 4;
pub const NODE_NAME: u64 = 3;
pub const NODE_ATTRIBUTE: u64 = 5;
pub const NODE_DOMAIN: u64 = 7;
pub const ATTRIBUTE_NAME: u64 = 1;
pub const ATTRIBUTE_FLOAT: u64 = 2;
pub const ATTRIBUTE_INT: u64 = 3;
pub const TENSOR_DIMS: u64 = 1;
pub const TENSOR_DATA_TYPE: u64 = 2;
pub const TENSOR_NAME: u64 = 8;
pub const TENSOR_RAW_DATA: u64 = 9;
pub const MODEL_OPSET_IMPORT: u64 = 8;

/// A NodeProto in the default domain, with at most one int attribute.
pub fn node(inputs: &[&[u8]], outputs: &[&[u8]], name: &str, op: &str, attr: Option<(&str, i64)>) -> Vec<u8> {
    let mut out = Vec::new();
    for i in inputs {
        put_bytes(&mut out, NODE_INPUT, i);
    }
    for o in outputs {
        put_bytes(&mut out, NODE_OUTPUT, o);
    }
    put_bytes(&mut out, NODE_NAME, name.as_bytes());
    put_bytes(&mut out, NODE_OP_TYPE, op.as_bytes());
    if let Some((n, v)) = attr {
        // AttributeProto: name(1), i(3), type(20) = INT(2); a negative int64 is its 10-byte varint.
        let mut a = Vec::new();
        put_bytes(&mut a, ATTRIBUTE_NAME, n.as_bytes());
        put_int(&mut a, ATTRIBUTE_INT, v as u64);
        put_int(&mut a, 20, 2);
        put_bytes(&mut out, NODE_ATTRIBUTE, &a);
    }
    out
}

/// A TensorProto initializer: int64 of shape `[values.len()]`.
pub fn int64_tensor(name: &str, values: &[i64]) -> Vec<u8> {
    let mut out = Vec::new();
    put_int(&mut out, TENSOR_DIMS, values.len() as u64);
    put_int(&mut out, TENSOR_DATA_TYPE, 7); // INT64
    put_bytes(&mut out, TENSOR_NAME, name.as_bytes());
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    put_bytes(&mut out, TENSOR_RAW_DATA, &raw);
    out
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
}
