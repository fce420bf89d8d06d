//! Exports: an open image served to other programs as a plain disk. `fuse`: the guest disk as
//! one raw file, over a regular file (QEMU's FUSE-export convention); `nbd`: an NBD server.

pub mod fuse;
pub mod nbd;
