//! Image-level operations, one module per `qemu-img` command.

pub mod info;
