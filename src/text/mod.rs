//! Text for text-to-image models: CLIP's tokenizer (`CLIPTokenizer` of transformers, from the
//! files Stable Diffusion repositories ship or the `tokenizer.json` transformers 5 writes).

pub mod clip_tokenizer;
pub mod learn_bpe;

pub use clip_tokenizer::{ClipTokenizer, Encoded};
