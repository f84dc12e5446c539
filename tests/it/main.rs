//! The integration tests, one binary (one link against libtorch instead of
//! one per file): each module is what used to be a file of its own under
//! tests/, with the shared helpers in `common`. Run one module with
//! `cargo test --test it MODULE::`.

mod common;

mod alignment;
mod binaries;
mod blobs;
mod bootstrap;
mod catalog_conformance;
mod catalog_rpcs;
mod checkpoint;
mod cli_catalog_jobs;
mod config_reference;
mod dashboard;
mod denoiser_training;
mod diffusion_oracle;
mod eval_harness;
mod generate_batching;
mod generate_init;
mod hot_reload;
mod job_queue;
mod multi_arch;
mod otlp_traces;
mod python_interop;
mod reflection;
mod server;
mod train_denoiser;
mod train_resume;
mod unit_transformer;
mod words_data;
mod words_zoo;
mod zoo_builder;
mod zoo_ingest;
