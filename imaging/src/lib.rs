//! Pillow-exact decoding, resampling and anyres tiling.
