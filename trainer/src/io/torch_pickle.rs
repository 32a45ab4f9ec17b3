//! PyTorch `torch.save` checkpoints (`pytorch_model.bin`, its shards, `mm_projector.bin`) read
//! without Python.
//!
//! The zip layout is `<stem>/data.pkl` (a pickle of the state dict) plus `<stem>/data/<key>`
//! (raw little-endian storages). candle's pickle module parses `data.pkl`: it only interprets
//! opcodes into a tree and never imports or calls anything. On top of that this module
//! - refuses any global a state dict of tensors does not need (`torch._utils._rebuild_tensor_v2`,
//!   `_rebuild_parameter`, `collections.OrderedDict`, `torch.*Storage`), so a pickled Python
//!   object is an error naming the file and the global rather than something silently dropped;
//! - reads each tensor lazily through its storage, offset and strides (views into shared
//!   storages, transposed tensors), checking the view lies inside the storage;
//! - rejects the pre-1.6 non-zip format and big-endian files with a clear message.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Globals a `torch.save`d state dict of tensors may name.
const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
];

/// One opened `torch.save` zip file.
pub struct TorchFile {
    path: PathBuf,
    zip: Mutex<zip::ZipArchive<BufReader<std::fs::File>>>,
    tensors: BTreeMap<String, TensorInfo>,
    skipped: BTreeMap<String, String>,
}

impl std::fmt::Debug for TorchFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.into(),
        msg: msg.into(),
    }
}

impl TorchFile {
    /// Parses the file's pickle and indexes its tensors; reads no tensor data.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        let mut magic = [0u8; 4];
        let n = (&file).read(&mut magic).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        if n < 4 || &magic != b"PK\x03\x04" {
            return Err(err(
                path,
                "not a torch zip checkpoint (torch < 1.6 wrote a bare pickle, which is not \
                 supported: re-save it with a newer torch or convert it to safetensors)",
            ));
        }
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        let mut zip = zip::ZipArchive::new(BufReader::new(file))
            .map_err(|e| err(path, format!("not a readable zip: {e}")))?;
        let names: Vec<String> = zip
            .file_names()
            .map(|n| n.map(|n| n.into_owned()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| err(path, format!("bad zip entry name: {e}")))?;
        let pkl = names
            .iter()
            .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
            .ok_or_else(|| err(path, "no data.pkl in the zip: not a torch.save checkpoint"))?
            .clone();
        let dir = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
        if let Some(bo) = names.iter().find(|n| **n == format!("{dir}byteorder")) {
            let mut s = String::new();
            zip.by_name(bo)
                .and_then(|mut r| Ok(r.read_to_string(&mut s)?))
                .map_err(|e| err(path, format!("{bo}: {e}")))?;
            if s.trim() != "little" {
                return Err(err(
                    path,
                    format!("byteorder `{}` is not supported", s.trim()),
                ));
            }
        }
        let obj = {
            let entry = zip
                .by_name(&pkl)
                .map_err(|e| err(path, format!("{pkl}: {e}")))?;
            let mut r = BufReader::new(entry);
            let mut stack = Stack::empty();
            stack.read_loop(&mut r).map_err(|e| {
                err(
                    path,
                    format!("{pkl}: {e} (only the pickle opcodes torch.save emits are supported)"),
                )
            })?;
            stack
                .finalize()
                .map_err(|e| err(path, format!("{pkl}: {e}")))?
        };
        check_globals(&obj).map_err(|g| {
            err(
                path,
                format!(
                    "the pickle refers to `{g}`, which a state dict of tensors never needs; \
                     refusing the file (nothing in it was run)"
                ),
            )
        })?;
        let Object::Dict(items) = obj else {
            return Err(err(
                path,
                "the pickle is not a dict of tensors (a state dict is expected)",
            ));
        };
        let data_dir = Path::new(&dir).join("data");
        let mut tensors = BTreeMap::new();
        let mut skipped = BTreeMap::new();
        for (k, v) in items {
            let Object::Unicode(key) = k.clone() else {
                return Err(err(path, format!("non-string key {k:?} in the state dict")));
            };
            if key == "_metadata" {
                continue;
            }
            match v.into_tensor_info(k, &data_dir) {
                Ok(Some(info)) => {
                    tensors.insert(key, info);
                }
                Ok(None) => {
                    skipped.insert(key, "not a tensor".into());
                }
                Err(e) => {
                    skipped.insert(key, format!("unsupported tensor: {e}"));
                }
            }
        }
        Ok(Self {
            path: path.into(),
            zip: Mutex::new(zip),
            tensors,
            skipped,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names and shapes of the readable tensors.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, Vec<usize>)> {
        self.tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.layout.dims().to_vec()))
    }

    /// Entries that are not readable tensors, with the reason (reported if one is needed).
    pub fn skipped(&self) -> &BTreeMap<String, String> {
        &self.skipped
    }

    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).map(|t| t.dtype)
    }

    /// Reads one tensor (contiguous, in its stored dtype) onto `dev`.
    pub fn load(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let e = |msg: String| err(&self.path, format!("tensor `{name}`: {msg}"));
        let info = self.tensors.get(name).ok_or_else(|| {
            e(self
                .skipped
                .get(name)
                .cloned()
                .unwrap_or_else(|| "not in the file".into()))
        })?;
        let es = info.dtype.size_in_bytes();
        let dims = info.layout.dims().to_vec();
        let stride = info.layout.stride().to_vec();
        let offset = info.layout.start_offset() / es;
        let n: usize = dims.iter().product();
        // Last element's index in the storage: the view must lie inside it.
        let last = offset
            + dims
                .iter()
                .zip(&stride)
                .map(|(d, s)| d.saturating_sub(1) * s)
                .sum::<usize>();
        if n > 0 && last >= info.storage_size {
            return Err(e(format!(
                "view (offset {offset}, shape {dims:?}, strides {stride:?}) exceeds its storage \
                 of {} elements",
                info.storage_size
            )));
        }
        let bytes = {
            let mut zip = self
                .zip
                .lock()
                .map_err(|_| e("zip reader lock poisoned".into()))?;
            let mut r = zip
                .by_name(&info.path)
                .map_err(|x| e(format!("storage {}: {x}", info.path)))?;
            let mut buf = Vec::with_capacity(info.storage_size * es);
            r.read_to_end(&mut buf)
                .map_err(|x| e(format!("storage {}: {x}", info.path)))?;
            buf
        };
        if bytes.len() < info.storage_size * es {
            return Err(e(format!(
                "storage {} has {} bytes, expected {}",
                info.path,
                bytes.len(),
                info.storage_size * es
            )));
        }
        let data = if info.layout.is_contiguous() {
            bytes[offset * es..(offset + n) * es].to_vec()
        } else {
            // Strided view: gather element by element (rare: transposed or sliced tensors).
            let mut out = Vec::with_capacity(n * es);
            let mut idx = vec![0usize; dims.len()];
            for _ in 0..n {
                let at = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
                out.extend_from_slice(&bytes[at * es..(at + 1) * es]);
                for d in (0..dims.len()).rev() {
                    idx[d] += 1;
                    if idx[d] < dims[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            out
        };
        Tensor::from_raw_buffer(&data, info.dtype, &dims, dev).map_err(|x| e(x.to_string()))
    }

    /// Every readable tensor (small files: projectors, tests).
    pub fn load_all(&self, dev: &Device) -> Result<Vec<(String, Tensor)>> {
        self.tensors
            .keys()
            .map(|k| Ok((k.clone(), self.load(k, dev)?)))
            .collect()
    }
}

/// The first global outside the allow-list, as `module.name`.
fn check_globals(obj: &Object) -> std::result::Result<(), String> {
    match obj {
        Object::Class {
            module_name,
            class_name,
        } => {
            let ok = ALLOWED_GLOBALS
                .iter()
                .any(|(m, c)| m == module_name && c == class_name)
                // candle reads Float/Half/BFloat16/Double/Long/Byte storages; tensors of other
                // storage types are listed as skipped, an error only if the model needs them.
                || (module_name == "torch" && class_name.ends_with("Storage"));
            if ok {
                Ok(())
            } else {
                Err(format!("{module_name}.{class_name}"))
            }
        }
        Object::Tuple(v) | Object::List(v) => v.iter().try_for_each(check_globals),
        Object::Dict(kv) => kv.iter().try_for_each(|(k, v)| {
            check_globals(k)?;
            check_globals(v)
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            check_globals(callable)?;
            check_globals(args)
        }
        Object::PersistentLoad(o) => check_globals(o),
        Object::Int(_)
        | Object::Long(_)
        | Object::Float(_)
        | Object::Unicode(_)
        | Object::Bool(_)
        | Object::None
        | Object::Mark => Ok(()),
    }
}

/// Whether `path` looks like a torch pickle checkpoint by its extension.
pub fn is_torch_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files written by `fixtures/torch/make_fixtures.py` with torch 2.15.0.
    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/torch")
            .join(name)
    }

    fn values(f: &TorchFile, name: &str) -> (DType, Vec<usize>, Vec<f64>) {
        let t = f.load(name, &Device::Cpu).expect(name);
        let dims = t.dims().to_vec();
        let v = t
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect(name);
        (t.dtype(), dims, v)
    }

    #[test]
    fn reads_a_torch_made_state_dict() {
        let f = TorchFile::open(&fixture("state_dict.bin")).expect("open");
        let cases: &[(&str, DType, &[usize], &[f64])] = &[
            (
                "weight",
                DType::F32,
                &[2, 3],
                &[-2.5, -1.5, -0.5, 0.5, 1.5, 2.5],
            ),
            ("bias", DType::F32, &[2], &[0.5, -1.0]),
            (
                "big",
                DType::F32,
                &[10],
                &[0., 1., 2., 3., 4., 5., 6., 7., 8., 9.],
            ),
            ("offset_view", DType::F32, &[4], &[3., 4., 5., 6.]),
            ("transposed", DType::F32, &[3, 2], &[0., 3., 1., 4., 2., 5.]),
            ("half", DType::F16, &[4], &[1.0, -2.0, 0.5, 65504.0]),
            ("bf16", DType::BF16, &[2, 2], &[1.0, -0.5, 3.0, 256.0]),
            ("position_ids", DType::I64, &[1, 5], &[0., 1., 2., 3., 4.]),
            ("scalar", DType::F32, &[], &[4.5]),
            ("param", DType::F32, &[2], &[7.0, 8.0]),
        ];
        for (name, dtype, dims, v) in cases {
            assert_eq!(
                values(&f, name),
                (*dtype, dims.to_vec(), v.to_vec()),
                "{name}"
            );
        }
        assert_eq!(f.shapes().count(), cases.len(), "no extra entries");
        assert!(f.skipped().is_empty(), "{:?}", f.skipped());
    }

    #[test]
    fn reads_a_bf16_projector() {
        let f = TorchFile::open(&fixture("mm_projector.bin")).expect("open");
        let (dt, dims, v) = values(&f, "model.mm_projector.0.weight");
        assert_eq!((dt, dims), (DType::BF16, vec![4, 3]));
        assert_eq!(v, (0..12).map(|i| i as f64 / 4.0).collect::<Vec<_>>());
    }

    #[test]
    fn refuses_pickled_code_and_legacy_files() {
        let e = TorchFile::open(&fixture("evil.bin"))
            .expect_err("evil")
            .to_string();
        assert!(e.contains("evil.bin") && e.contains("posix.system"), "{e}");
        let e = TorchFile::open(&fixture("legacy.bin"))
            .expect_err("legacy")
            .to_string();
        assert!(e.contains("legacy.bin") && e.contains("torch < 1.6"), "{e}");
        let e = TorchFile::open(&fixture("make_fixtures.py"))
            .expect_err("py")
            .to_string();
        assert!(e.contains("make_fixtures.py"), "{e}");
        let f = TorchFile::open(&fixture("state_dict.bin")).expect("open");
        let e = f
            .load("nope", &Device::Cpu)
            .expect_err("missing")
            .to_string();
        assert!(e.contains("state_dict.bin") && e.contains("`nope`"), "{e}");
    }
}
