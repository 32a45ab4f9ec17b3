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
/// CLIP normalisation constants (`openai/clip-vit-large-patch14-336` preprocessor).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
