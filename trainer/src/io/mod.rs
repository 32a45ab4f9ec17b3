//! Model files on disk: checkpoints in and out (safetensors and torch pickles), the HF files a
//! model folder carries (configs, tokenizer), and new model folders (`init`).

pub mod checkpoint;
pub mod checkpoint_tokenizer;
pub mod hf_tokenizer;
pub mod init;
pub mod json_file;
pub mod torch_pickle;
pub mod weights;
