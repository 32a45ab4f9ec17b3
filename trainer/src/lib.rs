//! `llava-trainer`: the LLaVA-NeXT model, data loader and training loop.
