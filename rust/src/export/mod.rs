//! Exports: an open image served to other programs as a plain disk (`nbd`: an NBD server).

pub mod nbd;
