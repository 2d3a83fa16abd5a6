//! Errors from reading or writing an image.

use std::path::PathBuf;

use thiserror::Error;

/// Why an image could not be read or written.
#[derive(Debug, Error)]
pub enum ImageError {
    /// An I/O error on one of the image's files.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest header is missing or malformed.
    #[error("{path}: not a persist image manifest: {reason}")]
    BadHeader {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The image was written by another version of the format.
    #[error(
        "{path}: image format version {found} is not supported (this build reads 1 to {expected})"
    )]
    Version {
        /// The manifest file.
        path: PathBuf,
        /// Version found in the header.
        found: u32,
        /// Newest version this build reads.
        expected: u32,
    },
    /// A checksum did not match: the image is corrupt.
    #[error("{path}: checksum mismatch in {what}: the image is corrupt")]
    Checksum {
        /// The file involved.
        path: PathBuf,
        /// Which part of the file.
        what: String,
    },
    /// The manifest's JSON is not a valid manifest.
    #[error("{path}: invalid manifest: {source}")]
    Json {
        /// The manifest file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest contradicts itself or the page store.
    #[error("{path}: inconsistent image: {reason}")]
    Inconsistent {
        /// The file involved.
        path: PathBuf,
        /// What does not add up.
        reason: String,
    },
    /// The image directory or a file in it is not to be trusted: owned by
    /// another user, writable by others, or not a regular file (see
    /// [`crate::trust`]). Never [`TrustError::Io`](crate::trust::TrustError::Io):
    /// a file that cannot be opened is [`ImageError::Io`].
    #[error(transparent)]
    Untrusted(crate::trust::TrustError),
    /// A base image's page store could not be hard-linked into a new delta
    /// image, typically because the two are on different filesystems
    /// (`EXDEV`). Nothing is wrong with either image: a full image can be
    /// written instead.
    #[error("{from}: cannot hard-link this page store to {to} for a delta image: {source}")]
    BaseLink {
        /// The base image's store file.
        from: PathBuf,
        /// The link that could not be made.
        to: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The image was taken on another kernel build.
    #[error(
        "image was taken on kernel {image} but this is {running}: images only restore on the same kernel build"
    )]
    KernelMismatch {
        /// Kernel release recorded in the image.
        image: String,
        /// Kernel release running now.
        running: String,
    },
    /// This CPU lacks state components the image's threads use.
    #[error("image needs CPU state components {missing:#x} (XCR0) that this CPU lacks")]
    CpuMismatch {
        /// XCR0 bits the image has and this CPU does not.
        missing: u64,
    },
}

impl From<crate::trust::TrustError> for ImageError {
    fn from(err: crate::trust::TrustError) -> Self {
        match err {
            crate::trust::TrustError::Io { path, source } => Self::Io { path, source },
            refused => Self::Untrusted(refused),
        }
    }
}

impl ImageError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
