//! Measuring inits: fine-tuning curves from a given initialization and the
//! steps they need to reach a target.

pub mod finetune;

pub use finetune::{
    DEFAULT_TARGET_FRACTION, FinetuneConfig, InitFileError, curve, params_from_safetensors,
    steps_to_target, target_of,
};
