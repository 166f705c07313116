//! Errors in the spec's format: `{"cniVersion", "code", "msg", "details"}` on stdout and a
//! non-zero exit.

use serde::Serialize;

/// Spec error codes the plugin uses (CNI spec, "Error" section), and its own (100+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 1: the configuration's cniVersion is not one this plugin speaks.
    IncompatibleVersion = 1,
    /// 4: an environment variable is missing or invalid.
    InvalidEnv = 4,
    /// 5: reading stdin or writing stdout failed.
    Io = 5,
    /// 6: stdin is not the JSON the spec says.
    Decode = 6,
    /// 7: the network configuration is unusable (no previous result, a bad field).
    InvalidConfig = 7,
    /// 11: try again later: the daemon is not reachable or did not answer in time.
    TryAgainLater = 11,
    /// 100: the daemon refused the pod (invalid capture configuration, or it could not be
    /// captured): it must not start.
    PodRefused = 100,
}

/// A failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's JSON error object for `version`.
    pub fn to_json(&self, version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version: version,
            code: self.code as u32,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"error\"}}", self.code as u32))
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}
