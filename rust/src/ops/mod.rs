//! Image-level operations, one module per `qemu-img` command, built on the open image
//! (`QcowFile`), its mapping and its backing chain.

pub mod amend;
pub mod bitmap;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod info;
pub mod map;
pub mod measure;
mod pipeline;
pub mod rebase;
pub mod resize;
pub mod snapshot;
