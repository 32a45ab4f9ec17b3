//! New model folders' weights: seeded random initialisation in the HF layout ([`random`],
//! `llava-trainer init`) and assembly from separate Llama-3 / CLIP / projector checkpoints
//! ([`assemble`]).

pub mod assemble;
pub mod random;

pub use assemble::{load_for_export, load_projector, load_source, ModelSource};
pub use random::{all_params, init_missing, random_model, InitSpec};
