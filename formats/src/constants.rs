//! Constants shared by both halves (values from the reference's `llava/constants.py`).

/// Label value of positions that are not trained on.
pub const IGNORE_INDEX: i32 = -100;
/// Input id of one image placeholder; the model expands it into the image's feature tokens.
pub const IMAGE_TOKEN_INDEX: i32 = -200;
/// Side of one CLIP ViT-L/14-336 tile, in pixels.
pub const TILE_SIZE: u32 = 336;
/// Patch tokens per tile (24 x 24 patches of 14 px).
pub const PATCHES_PER_SIDE: u32 = 24;
/// Feature tokens of one tile (CLS dropped).
pub const TOKENS_PER_TILE: u32 = PATCHES_PER_SIDE * PATCHES_PER_SIDE;
/// CLIP normalisation constants (`openai/clip-vit-large-patch14-336` preprocessor), as the Python
/// floats (f64) of the reference's config.
pub const CLIP_MEAN_F64: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD_F64: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// The same rounded f64 → f32, as numpy does when it normalises float32 pixels (a direct decimal →
/// f32 parse could round differently).
pub const CLIP_MEAN: [f32; 3] = [
    CLIP_MEAN_F64[0] as f32,
    CLIP_MEAN_F64[1] as f32,
    CLIP_MEAN_F64[2] as f32,
];
pub const CLIP_STD: [f32; 3] = [
    CLIP_STD_F64[0] as f32,
    CLIP_STD_F64[1] as f32,
    CLIP_STD_F64[2] as f32,
];
