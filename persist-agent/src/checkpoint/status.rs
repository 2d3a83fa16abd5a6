//! `/proc/PID/status` (or a thread's) as key/value pairs.

use std::collections::HashMap;
use std::fs;

use super::CheckpointError;

/// The fields of a status file.
#[derive(Debug, Clone)]
pub struct Status {
    pid: i32,
    path: String,
    fields: HashMap<String, String>,
}

impl Status {
    /// Reads `/proc/PID/status`, or `/proc/PID/task/TID/status` with a `tid`.
    pub fn read(pid: i32, tid: Option<i32>) -> Result<Self, CheckpointError> {
        let path = match tid {
            Some(tid) => format!("/proc/{pid}/task/{tid}/status"),
            None => format!("/proc/{pid}/status"),
        };
        let text = fs::read_to_string(&path).map_err(|source| CheckpointError::Proc {
            pid,
            path: path.clone(),
            source,
        })?;
        Ok(Self::parse(pid, path, &text))
    }

    fn parse(pid: i32, path: String, text: &str) -> Self {
        let fields = text
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(key, value)| (key.to_owned(), value.trim().to_owned()))
            .collect();
        Self { pid, path, fields }
    }

    fn bad(&self, key: &str) -> CheckpointError {
        CheckpointError::ProcField {
            pid: self.pid,
            path: self.path.clone(),
            field: key.to_owned(),
        }
    }

    /// The raw text of field `key`.
    pub fn text(&self, key: &str) -> Result<&str, CheckpointError> {
        self.fields
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| self.bad(key))
    }

    /// Field `key` as a hexadecimal number (signal and capability masks).
    pub fn hex(&self, key: &str) -> Result<u64, CheckpointError> {
        u64::from_str_radix(self.text(key)?, 16).map_err(|_| self.bad(key))
    }

    /// Field `key` as an octal number (`Umask`).
    pub fn octal(&self, key: &str) -> Result<u32, CheckpointError> {
        u32::from_str_radix(self.text(key)?, 8).map_err(|_| self.bad(key))
    }

    /// Field `key` as whitespace-separated decimal numbers.
    pub fn numbers(&self, key: &str) -> Result<Vec<u64>, CheckpointError> {
        self.text(key)?
            .split_whitespace()
            .map(|word| word.parse().map_err(|_| self.bad(key)))
            .collect()
    }

    /// Field `key` as one decimal number.
    pub fn number(&self, key: &str) -> Result<u64, CheckpointError> {
        self.numbers(key)?
            .first()
            .copied()
            .ok_or_else(|| self.bad(key))
    }

    /// Field `key` if present, as one decimal number.
    pub fn optional_number(&self, key: &str) -> Result<Option<u64>, CheckpointError> {
        if self.fields.contains_key(key) {
            self.number(key).map(Some)
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_fields() {
        let status = Status::parse(
            1,
            "status".into(),
            "Name:\tcat\nUmask:\t0022\nUid:\t0\t1\t2\t3\nGroups:\t\nSigPnd:\t0000000000000100\n",
        );
        assert_eq!(status.text("Name").unwrap(), "cat");
        assert_eq!(status.octal("Umask").unwrap(), 0o22);
        assert_eq!(status.numbers("Uid").unwrap(), vec![0, 1, 2, 3]);
        assert!(status.numbers("Groups").unwrap().is_empty());
        assert_eq!(status.hex("SigPnd").unwrap(), 0x100);
        assert!(status.number("Missing").is_err());
    }
}
