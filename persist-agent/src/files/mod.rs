//! Saving and recreating file descriptors, for checkpoint and restore.
