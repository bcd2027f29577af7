//! Checkpoints in the Hugging Face safetensors layout: reading them into a
//! `VarStore` strictly, and writing ours so that diffusers and transformers read them.
//!
//! Layout followed (diffusers `ModelMixin.from_pretrained`, transformers
//! `PreTrainedModel.from_pretrained`): one `<stem>.safetensors`, or shards listed
//! by `<stem>.safetensors.index.json` (`{"weight_map": {tensor: shard file}}`).
//! Tensor names are the model's parameter names; our modules are built under
//! `nn::Path`s with exactly those names, so a name is the same on both sides.
//!
//! Why not `VarStore::load`: it ignores unexpected tensors silently and reports a
//! missing one only at the first miss. A checkpoint for a different config must
//! fail at start-up with the whole list of differences, so we compare the name
//! sets and shapes ourselves, then copy (converting f16/bf16 to the variable's kind).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{Kind, Tensor};

use super::error::{NnError, Result};

/// How many names an error lists before it summarises the rest.
const LIST_LIMIT: usize = 12;

/// Finds the checkpoint files for `stem` in `dir`: the single file if present,
/// else the shards named by the index.
pub fn checkpoint_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if !index.is_file() {
        return Err(NnError::io(
            &single,
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("no {stem}.safetensors nor its .index.json")),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| NnError::io(&index, e))?;
    let parsed: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| NnError::Json { file: index.display().to_string(), source })?;
    let map = parsed.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| NnError::Invalid {
        file: index.display().to_string(),
        field: "weight_map".into(),
        reason: "missing or not an object".into(),
    })?;
    let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

/// Which checkpoint tensors a model may leave unused (for example BERT's
/// `embeddings.position_ids` buffer, or a pooler the encoder does not run).
pub type Ignore<'a> = &'a dyn Fn(&str) -> bool;

/// A frozen model from the checkpoint `<stem>` in `dir`: `build` declares its
/// variables (on the CPU, in f32), every one is filled strictly (see
/// [`load_into`]), and the store is frozen and moved to `device` in `kind`.
pub fn load_frozen<M>(
    dir: &Path,
    stem: &str,
    device: tch::Device,
    kind: Kind,
    build: impl FnOnce(&tch::nn::Path<'_>) -> Result<M>,
) -> Result<(tch::nn::VarStore, M)> {
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = build(&vs.root())?;
    load_into(&vs, &checkpoint_files(dir, stem)?, &|_| false)?;
    vs.freeze();
    super::device::place(&mut vs, device, kind);
    Ok((vs, model))
}

/// Loads `files` into the variables of `vs`. Every variable must be present with
/// its exact shape; every tensor in the files must be a variable unless `ignore`
/// accepts its name. Values are converted to each variable's kind and device.
pub fn load_into(vs: &tch::nn::VarStore, files: &[PathBuf], ignore: Ignore<'_>) -> Result<()> {
    let variables = vs.variables();
    let label = files.first().map(|f| f.display().to_string()).unwrap_or_default();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut unexpected = Vec::new();
    let mut wrong_shape = Vec::new();
    let mut copies: Vec<(String, Tensor)> = Vec::new();
    for file in files {
        let mapped = map_file(file)?;
        let st = parse(file, &mapped)?;
        for (name, view) in st.tensors() {
            match variables.get(&name) {
                None if ignore(&name) => {}
                None => unexpected.push(name),
                Some(var) => {
                    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                    if shape != var.size() {
                        wrong_shape.push(format!("{name}: checkpoint {:?}, model {:?}", shape, var.size()));
                    } else {
                        copies.push((name.clone(), to_tensor(file, &name, &view)?));
                    }
                    seen.insert(name);
                }
            }
        }
    }
    let missing: Vec<String> = variables.keys().filter(|k| !seen.contains(*k)).cloned().collect();
    if !missing.is_empty() || !unexpected.is_empty() || !wrong_shape.is_empty() {
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!("missing {}", summarise(missing)));
        }
        if !unexpected.is_empty() {
            parts.push(format!("unexpected {}", summarise(unexpected)));
        }
        if !wrong_shape.is_empty() {
            parts.push(format!("wrong shape {}", summarise(wrong_shape)));
        }
        return Err(NnError::Mismatch { file: label, detail: parts.join("; ") });
    }
    tch::no_grad(|| -> Result<()> {
        for (name, src) in copies {
            let mut var = variables[&name].shallow_clone();
            let src = src.f_to_kind(var.kind())?.f_to_device(var.device())?;
            var.f_copy_(&src)?;
        }
        Ok(())
    })
}

/// Reads every tensor of one safetensors file (for fixtures and tools).
pub fn read_all(file: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mapped = map_file(file)?;
    let st = parse(file, &mapped)?;
    st.tensors().into_iter().map(|(name, view)| Ok((name.clone(), to_tensor(file, &name, &view)?))).collect()
}

/// Writes the variables of `vs` to `file` in `kind` (f32, f16 or bf16), with the
/// `{"format": "pt"}` metadata that diffusers and transformers expect.
pub fn save(vs: &tch::nn::VarStore, file: &Path, kind: Kind) -> Result<()> {
    let tensors: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| Ok((name, t.f_to_kind(kind)?.f_to_device(tch::Device::Cpu)?.f_contiguous()?)))
        .collect::<Result<_>>()?;
    save_tensors(&tensors, file)
}

/// Writes named tensors to one safetensors file with `{"format": "pt"}` metadata.
pub fn save_tensors(tensors: &BTreeMap<String, Tensor>, file: &Path) -> Result<()> {
    let views: Vec<(String, OwnedView)> =
        tensors.iter().map(|(n, t)| Ok((n.clone(), OwnedView::new(n, t)?))).collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(views, Some(metadata), file)
        .map_err(|e| NnError::Safetensors { file: file.display().to_string(), reason: e.to_string() })?;
    // The safetensors crate writes through a private (0600) temporary file;
    // weights are read by other users too (a container's non-root server).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).map_err(|e| NnError::io(file, e))?;
    }
    Ok(())
}

fn map_file(file: &Path) -> Result<memmap2::Mmap> {
    let handle = File::open(file).map_err(|e| NnError::io(file, e))?;
    // SAFETY: the mapping is read-only and lives only while we copy out of it;
    // a checkpoint truncated underneath us is an operator error we cannot guard.
    unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| NnError::io(file, e))
}

fn parse<'a>(file: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| NnError::Safetensors { file: file.display().to_string(), reason: e.to_string() })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn to_tensor(file: &Path, name: &str, view: &TensorView<'_>) -> Result<Tensor> {
    let kind = kind_of(view.dtype()).ok_or_else(|| NnError::Safetensors {
        file: file.display().to_string(),
        reason: format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
    })?;
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
}

fn summarise(mut names: Vec<String>) -> String {
    names.sort();
    let n = names.len();
    let shown = names.iter().take(LIST_LIMIT).cloned().collect::<Vec<_>>().join(", ");
    if n > LIST_LIMIT {
        format!("({n}): {shown}, … and {} more", n - LIST_LIMIT)
    } else {
        format!("({n}): {shown}")
    }
}

/// A CPU tensor's bytes in the form `safetensors::serialize` wants.
struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl OwnedView {
    fn new(name: &str, t: &Tensor) -> Result<Self> {
        let dtype = dtype_of(t.kind()).ok_or_else(|| NnError::input(name, format!("cannot save kind {:?}", t.kind())))?;
        let t = t.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)?;
        Ok(Self { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), bytes })
    }
}

impl safetensors::View for OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    fn store() -> nn::VarStore {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let root = vs.root();
        let _ = nn::linear(&root / "proj", 3, 2, Default::default());
        vs
    }

    #[test]
    fn round_trips_in_half_precision_and_reports_mismatches() {
        let dir = std::env::temp_dir().join(format!("diffusiond-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("m.safetensors");
        let a = store();
        save(&a, &file, Kind::Half).unwrap();
        let b = store();
        load_into(&b, std::slice::from_ref(&file), &|_| false).unwrap();
        let (wa, wb) = (&a.variables()["proj.weight"], &b.variables()["proj.weight"]);
        let err = (wa - wb).abs().max().double_value(&[]);
        assert!(err < 1e-3, "f16 round trip error {err}");
        assert_eq!(wb.kind(), Kind::Float);

        // A model with another shape and an extra tensor: every difference is listed.
        let c = nn::VarStore::new(tch::Device::Cpu);
        let _ = nn::linear(&c.root() / "proj", 4, 2, Default::default());
        let _ = nn::linear(&c.root() / "other", 1, 1, Default::default());
        let msg = load_into(&c, std::slice::from_ref(&file), &|_| false).unwrap_err().to_string();
        assert!(msg.contains("missing (2): other.bias, other.weight"), "{msg}");
        assert!(msg.contains("wrong shape (1): proj.weight"), "{msg}");

        // Unexpected tensors fail unless the model declares them ignorable.
        let d = nn::VarStore::new(tch::Device::Cpu);
        let _ = nn::linear(&d.root() / "proj", 3, 2, nn::LinearConfig { bias: false, ..Default::default() });
        let msg = load_into(&d, std::slice::from_ref(&file), &|_| false).unwrap_err().to_string();
        assert!(msg.contains("unexpected (1): proj.bias"), "{msg}");
        load_into(&d, &[file], &|n| n == "proj.bias").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
