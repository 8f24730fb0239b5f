//! The Python bindings: one file per exported function group or class. They only convert
//! arguments, release the GIL around real work and hand numpy arrays in and out without copies;
//! the logic lives in the crate's other modules.

pub mod convert;
pub mod errors;
pub mod indexing;
pub mod prompts;
pub mod selection;
pub mod tracker;
