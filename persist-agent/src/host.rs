//! Facts about this machine that an image depends on: kernel build and CPU state size.
