//! ONNX Runtime's `.onnx_adapter` files, written (and read back) without Python.
//!
//! The format is a FlatBuffers buffer (schema `onnxruntime/lora/adapter_format/adapter_schema.fbs`,
//! file identifier `TORT`): an `Adapter` table (`format_version` 1, `adapter_version`,
//! `model_version`, `parameters`) of `Parameter` tables (`name`, `dims` int64, `data_type`
//! (1 = float32), `raw_data` bytes). This writer lays the buffer out front to back with forward
//! offsets, every vtable right before its table, and 8-byte aligned `raw_data` and `dims`.
//!
//! Parameter names and layout follow the graphs `scripts/export_onnx.py --lora-inputs` writes
//! (onnxruntime-genai's builder): `model.layers.N.{attn|mlp}.M.lora_{A|B}.MatMul.weight`, A as
//! `[in, r]` and B as `[r, out]` with the adapter's scale folded into B.
use super::adapter::{LoraAdapter, Module};

/// One named float32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub dims: Vec<i64>,
    pub data: Vec<f32>,
}

/// The graph's input name for `(layer, module)`'s A (`a = true`) or B.
pub fn param_name(layer: usize, m: Module, a: bool) -> String {
    let block = if m.block() == "self_attn" { "attn" } else { "mlp" };
    format!("model.layers.{layer}.{block}.{}.lora_{}.MatMul.weight", m.hf_name(), if a { "A" } else { "B" })
}

/// The adapter as the LoRA graph's inputs, sorted by name.
pub fn params(adapter: &LoraAdapter) -> Vec<Param> {
    let mut out = Vec::with_capacity(2 * adapter.modules.len());
    for (&(layer, m), p) in &adapter.modules {
        let (r, i, o) = (p.rank, p.in_dim, p.out_dim);
        let mut a = vec![0f32; i * r];
        let mut b = vec![0f32; r * o];
        for k in 0..r {
            for x in 0..i {
                a[x * r + k] = p.a[k * i + x];
            }
            for y in 0..o {
                b[k * o + y] = (p.scale * f64::from(p.b[y * r + k])) as f32;
            }
        }
        out.push(Param { name: param_name(layer, m, true), dims: vec![i as i64, r as i64], data: a });
        out.push(Param { name: param_name(layer, m, false), dims: vec![r as i64, o as i64], data: b });
    }
    out.sort_by(|x, y| x.name.cmp(&y.name));
    out
}

const FLOAT: i32 = 1;
const IDENT: &[u8; 4] = b"TORT";

struct Buf(Vec<u8>);

impl Buf {
    fn pad_to(&mut self, align: usize, offset: usize) {
        while (self.0.len() + offset) % align != 0 {
            self.0.push(0);
        }
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn patch(&mut self, at: usize, target: usize) {
        // A uoffset: from the field's own position forward to the target.
        let v = (target - at) as u32;
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// Writes a vtable for a table of `n` 4-byte fields, then the table's soffset; returns the
    /// table's position. Fields follow at table + 4 + 4k.
    fn table(&mut self, n: usize) -> usize {
        self.pad_to(2, 0);
        let vt = self.0.len();
        self.u16((4 + 2 * n) as u16);
        self.u16((4 + 4 * n) as u16);
        for k in 0..n {
            self.u16((4 + 4 * k) as u16);
        }
        self.pad_to(4, 0);
        let t = self.0.len();
        self.i32((t - vt) as i32);
        t
    }
}

/// Serialises `params` as an `.onnx_adapter` file.
pub fn write(params: &[Param], adapter_version: i32, model_version: i32) -> Vec<u8> {
    let mut b = Buf(Vec::new());
    b.u32(0); // root offset, patched below
    b.0.extend_from_slice(IDENT);
    let root = b.table(4);
    b.i32(1); // format_version
    b.i32(adapter_version);
    b.i32(model_version);
    let params_field = b.0.len();
    b.u32(0);
    b.patch(0, root);
    // parameters: vector of offsets to tables.
    b.pad_to(4, 0);
    let vec_pos = b.0.len();
    b.patch(params_field, vec_pos);
    b.u32(params.len() as u32);
    let slots: Vec<usize> = (0..params.len()).map(|_| { let p = b.0.len(); b.u32(0); p }).collect();
    for (p, slot) in params.iter().zip(slots) {
        let t = b.table(4);
        b.patch(slot, t);
        let (name_f, dims_f) = (t + 4, t + 8);
        b.u32(0);
        b.u32(0);
        b.i32(FLOAT);
        let raw_f = b.0.len();
        b.u32(0);
        // name: u32 length, bytes, NUL.
        b.pad_to(4, 0);
        b.patch(name_f, b.0.len());
        b.u32(p.name.len() as u32);
        b.0.extend_from_slice(p.name.as_bytes());
        b.0.push(0);
        // dims: int64 elements 8-aligned.
        b.pad_to(8, 4);
        b.patch(dims_f, b.0.len());
        b.u32(p.dims.len() as u32);
        for d in &p.dims {
            b.0.extend_from_slice(&d.to_le_bytes());
        }
        // raw_data: force_align 8.
        b.pad_to(8, 4);
        b.patch(raw_f, b.0.len());
        b.u32((p.data.len() * 4) as u32);
        for x in &p.data {
            b.0.extend_from_slice(&x.to_le_bytes());
        }
    }
    b.pad_to(8, 0);
    b.0
}

/// Reads an `.onnx_adapter` buffer (float32 parameters only), checking every offset.
pub fn read(buf: &[u8]) -> Result<Vec<Param>, String> {
    let bad = |what: &str| format!("not a valid .onnx_adapter file: {what}");
    if buf.len() < 8 || &buf[4..8] != IDENT {
        return Err(bad("no TORT identifier"));
    }
    let u32_at = |at: usize| -> Result<usize, String> {
        buf.get(at..at + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap()) as usize).ok_or_else(|| bad("offset out of range"))
    };
    let i32_at = |at: usize| -> Result<i32, String> { u32_at(at).map(|v| v as u32 as i32) };
    let u16_at = |at: usize| -> Result<usize, String> {
        buf.get(at..at + 2).map(|s| u16::from_le_bytes(s.try_into().unwrap()) as usize).ok_or_else(|| bad("offset out of range"))
    };
    // Position of field `k` of the table at `t`, or None when absent.
    let field = |t: usize, k: usize| -> Result<Option<usize>, String> {
        let vt = (t as i64 - i64::from(i32_at(t)?)) as usize;
        let vt_len = u16_at(vt)?;
        if 4 + 2 * k >= vt_len {
            return Ok(None);
        }
        let off = u16_at(vt + 4 + 2 * k)?;
        Ok((off != 0).then_some(t + off))
    };
    let deref = |at: usize| -> Result<usize, String> { Ok(at + u32_at(at)?) };
    let root = deref(0)?;
    let version = field(root, 0)?.map(i32_at).transpose()?.unwrap_or(0);
    if version != 1 {
        return Err(bad(&format!("format_version {version}, expected 1")));
    }
    let Some(pf) = field(root, 3)? else { return Ok(Vec::new()) };
    let v = deref(pf)?;
    let n = u32_at(v)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = deref(v + 4 + 4 * i)?;
        let name = match field(t, 0)? {
            Some(f) => {
                let s = deref(f)?;
                let len = u32_at(s)?;
                let bytes = buf.get(s + 4..s + 4 + len).ok_or_else(|| bad("name out of range"))?;
                String::from_utf8(bytes.to_vec()).map_err(|_| bad("name is not UTF-8"))?
            }
            None => String::new(),
        };
        let dims = match field(t, 1)? {
            Some(f) => {
                let d = deref(f)?;
                let len = u32_at(d)?;
                let bytes = buf.get(d + 4..d + 4 + 8 * len).ok_or_else(|| bad("dims out of range"))?;
                bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
            }
            None => Vec::new(),
        };
        let dtype = field(t, 2)?.map(i32_at).transpose()?.unwrap_or(0);
        if dtype != FLOAT {
            return Err(bad(&format!("parameter {name} has data type {dtype}; only float32 (1) is supported")));
        }
        let data: Vec<f32> = match field(t, 3)? {
            Some(f) => {
                let d = deref(f)?;
                let len = u32_at(d)?;
                let bytes = buf.get(d + 4..d + 4 + len).ok_or_else(|| bad("raw_data out of range"))?;
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
            }
            None => Vec::new(),
        };
        if dims.iter().product::<i64>() != data.len() as i64 {
            return Err(bad(&format!("parameter {name}: dims {dims:?} do not match {} values", data.len())));
        }
        out.push(Param { name, dims, data });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_gives_the_parameters_back() {
        let ps = vec![
            Param { name: "a".into(), dims: vec![2, 3], data: vec![1., 2., 3., 4., 5., 6.] },
            Param { name: "model.layers.0.attn.q_proj.lora_B.MatMul.weight".into(), dims: vec![1, 1], data: vec![-0.5] },
            Param { name: "empty".into(), dims: vec![0, 4], data: vec![] },
        ];
        let bytes = write(&ps, 1, 1);
        assert_eq!(&bytes[4..8], b"TORT");
        assert_eq!(read(&bytes).unwrap(), ps);
        assert!(read(&bytes[..6]).is_err());
        assert!(read(b"12345678abcd").is_err());
    }

    #[test]
    fn names_follow_the_builder() {
        assert_eq!(param_name(3, Module::Down, true), "model.layers.3.mlp.down_proj.lora_A.MatMul.weight");
        assert_eq!(param_name(0, Module::V, false), "model.layers.0.attn.v_proj.lora_B.MatMul.weight");
    }
}
