//! Typed errors. Every invalid argument names the argument.

use std::fmt;

/// Everything a natsl call can fail with. No natsl entry point panics on bad input.
#[derive(Debug)]
pub enum Error {
    /// An argument is malformed: wrong shape, stride, dtype, alignment, length or value.
    InvalidArgument { arg: &'static str, reason: String },
    /// A valid request that this build or device does not support (e.g. a head dim).
    Unsupported(String),
    /// No CUDA driver or no device.
    NoDevice(String),
    /// NVRTC is not installed or failed to load.
    NvrtcUnavailable(String),
    /// A kernel failed to compile (a bug of the crate): the unit's name and the compiler log.
    Compile { name: String, log: String },
    /// A CUDA driver call failed.
    Driver(cudarc::driver::DriverError),
    /// Disk-cache or file I/O.
    Io(std::io::Error),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(arg: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidArgument { arg, reason: reason.into() }
    }
    /// The argument an [`Error::InvalidArgument`] names.
    pub fn arg(&self) -> Option<&'static str> {
        match self {
            Error::InvalidArgument { arg, .. } => Some(arg),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { arg, reason } => write!(f, "invalid argument `{arg}`: {reason}"),
            Error::Unsupported(s) => write!(f, "unsupported: {s}"),
            Error::NoDevice(s) => write!(f, "no CUDA device: {s}"),
            Error::NvrtcUnavailable(s) => write!(f, "NVRTC unavailable: {s}"),
            Error::Compile { name, log } => write!(f, "kernel {name} failed to compile:\n{log}"),
            Error::Driver(e) => write!(f, "CUDA driver error: {e:?}"),
            Error::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(e)
    }
}
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
