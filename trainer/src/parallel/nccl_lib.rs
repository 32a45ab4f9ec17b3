//! The NCCL library, opened at run time (`dlopen` of `libnccl.so.2`) when a multi-rank CUDA job
//! starts: single-GPU runs, `parity` and `bench` never need it. Only the calls the trainer
//! makes are bound, with the C signatures of `nccl.h` (stable since NCCL 2.0).
//!
//! Not gated on the `cuda` feature: loading and its error are plain host code (tested on the
//! CPU build); the collectives themselves take raw device pointers and a CUDA stream.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use crate::{Error, Result};

/// `ncclResult_t`: 0 is success.
pub type NcclResult = c_int;
/// `ncclComm_t`.
pub type RawComm = *mut c_void;
/// `cudaStream_t` (the driver's `CUstream` is the same pointer).
pub type RawStream = *mut c_void;

/// `ncclUniqueId`: 128 opaque bytes made by rank 0 and handed to every rank.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; 128],
}

/// `ncclDataType_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub enum DataType {
    Int8 = 0,
    Uint8 = 1,
    Int32 = 2,
    Uint32 = 3,
    Int64 = 4,
    Uint64 = 5,
    Float16 = 6,
    Float32 = 7,
    Float64 = 8,
    Bfloat16 = 9,
}

/// `ncclSum` of `ncclRedOp_t`.
pub const SUM: c_int = 0;

type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> NcclResult;
type CommInitRank = unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> NcclResult;
type CommOp = unsafe extern "C" fn(RawComm) -> NcclResult;
type GetErrorString = unsafe extern "C" fn(NcclResult) -> *const c_char;
type CommGetAsyncError = unsafe extern "C" fn(RawComm, *mut NcclResult) -> NcclResult;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    DataType,
    c_int,
    RawComm,
    RawStream,
) -> NcclResult;
type Reduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    DataType,
    c_int,
    c_int,
    RawComm,
    RawStream,
) -> NcclResult;
type ReduceScatter = AllReduce;
type AllGather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    DataType,
    RawComm,
    RawStream,
) -> NcclResult;
type Broadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    DataType,
    c_int,
    RawComm,
    RawStream,
) -> NcclResult;
type Group = unsafe extern "C" fn() -> NcclResult;

/// The library's entry points (the `Library` stays open as long as they are used).
pub struct Nccl {
    _lib: libloading::Library,
    pub get_unique_id: GetUniqueId,
    pub comm_init_rank: CommInitRank,
    pub comm_abort: CommOp,
    pub comm_destroy: CommOp,
    pub comm_get_async_error: CommGetAsyncError,
    pub get_error_string: GetErrorString,
    pub all_reduce: AllReduce,
    pub reduce: Reduce,
    pub reduce_scatter: ReduceScatter,
    pub all_gather: AllGather,
    pub broadcast: Broadcast,
    pub group_start: Group,
    pub group_end: Group,
}

/// The soname the NCCL 2 packages install.
pub const SONAME: &str = "libnccl.so.2";

/// What provides the library, for the error of a machine without it.
pub const PROVIDERS: &str = "it comes with pip's `nvidia-nccl-cu13` (or -cu12; add its \
     site-packages/nvidia/nccl/lib folder to LD_LIBRARY_PATH) or Debian/Ubuntu's `libnccl2` \
     (NVIDIA's CUDA apt repository)";

impl Nccl {
    /// The process's NCCL, loaded on first use: `LLAVA_NCCL_LIBRARY` when set, else
    /// [`SONAME`] from the loader's search path.
    pub fn get() -> Result<&'static Nccl> {
        static LIB: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
        let path = std::env::var("LLAVA_NCCL_LIBRARY").unwrap_or_else(|_| SONAME.to_string());
        LIB.get_or_init(|| Nccl::open(&path).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Distributed(e.clone()))
    }

    /// Opens the NCCL library at `path` (a file, or a name for the loader's search path).
    pub fn open(path: &str) -> Result<Nccl> {
        let missing = |e: String| {
            Error::Distributed(format!(
                "multi-GPU training needs NCCL and {path} cannot be loaded ({e}): {PROVIDERS}"
            ))
        };
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| missing(e.to_string()))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the types above are nccl.h's signatures of these symbols.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| missing(format!("no symbol {}: {e}", $name)))?
            };
        }
        Ok(Nccl {
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            comm_abort: sym!("ncclCommAbort"),
            comm_destroy: sym!("ncclCommDestroy"),
            comm_get_async_error: sym!("ncclCommGetAsyncError"),
            get_error_string: sym!("ncclGetErrorString"),
            all_reduce: sym!("ncclAllReduce"),
            reduce: sym!("ncclReduce"),
            reduce_scatter: sym!("ncclReduceScatter"),
            all_gather: sym!("ncclAllGather"),
            broadcast: sym!("ncclBroadcast"),
            group_start: sym!("ncclGroupStart"),
            group_end: sym!("ncclGroupEnd"),
            _lib: lib,
        })
    }

    /// `Ok` for `ncclSuccess`, else an error naming the call and NCCL's own message.
    pub fn check(&self, what: &str, r: NcclResult) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for any result code.
        let msg = unsafe {
            let p = (self.get_error_string)(r);
            if p.is_null() {
                String::from("unknown error")
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        Err(Error::Distributed(format!(
            "{what} failed: {msg} (ncclResult {r})"
        )))
    }

    /// A fresh unique id (rank 0).
    pub fn unique_id(&self) -> Result<UniqueId> {
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid out-pointer.
        self.check("ncclGetUniqueId", unsafe { (self.get_unique_id)(&mut id) })?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_names_it_and_what_provides_it() {
        let err = Nccl::open("/nonexistent/libnccl.so.2")
            .err()
            .expect("no such file")
            .to_string();
        assert!(err.contains("/nonexistent/libnccl.so.2"), "{err}");
        assert!(err.contains("nvidia-nccl-cu13"), "{err}");
        assert!(err.contains("libnccl2"), "{err}");
    }

    #[test]
    fn a_library_without_nccl_symbols_is_refused() {
        // libc is loaded in every process and has none of NCCL's symbols.
        let err = Nccl::open("libc.so.6").err().expect("not NCCL").to_string();
        assert!(err.contains("ncclGetUniqueId"), "{err}");
    }
}
