//! CNI error results: `{"cniVersion","code","msg","details"}` on stdout and
//! exit status 1, with the spec's well-known codes and canal's own (100+).

use serde::Serialize;

/// Well-known and canal-specific CNI error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 1: incompatible CNI version.
    IncompatibleVersion = 1,
    /// 2: unsupported field in the network configuration.
    UnsupportedField = 2,
    /// 3: container unknown or does not exist (its network namespace is gone).
    UnknownContainer = 3,
    /// 4: invalid necessary environment variables.
    InvalidEnvironment = 4,
    /// 5: I/O failure.
    Io = 5,
    /// 6: failed to decode content.
    Decode = 6,
    /// 7: invalid network configuration.
    InvalidConfig = 7,
    /// 11: try again later (canal-agent has not written network.json yet).
    TryAgainLater = 11,
    /// 50: the plugin is not available (STATUS).
    NotAvailable = 50,
    /// 100: no free address in the node's pod subnet.
    SubnetExhausted = 100,
    /// 101: setting up the pod's interface in the kernel failed.
    Dataplane = 101,
    /// 102: CHECK found the pod's network different from what ADD set up.
    CheckFailed = 102,
    /// 103: the container already has an interface on this network.
    AlreadyAttached = 103,
    /// 104: something canal did not make is in the way (an interface of
    /// that name, a route canal would have to replace).
    Conflict = 104,
}

/// A CNI error result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("CNI error {code}: {msg}: {details}")]
pub struct CniError {
    /// The CNI version of the error document.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Error code (1-99 are the spec's, 100+ canal's).
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Details: what exactly went wrong and what to do.
    pub details: String,
}

impl CniError {
    /// An error with `code`, a short message and details.
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            cni_version: super::config::LATEST_VERSION.into(),
            code: code as u32,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The same error reported in `version` (the request's cniVersion).
    pub fn in_version(mut self, version: &str) -> CniError {
        if super::config::SUPPORTED_VERSIONS.contains(&version) {
            self.cni_version = version.to_string();
        }
        self
    }

    /// JSON text.
    pub fn to_json(&self) -> String {
        // Serialising a struct of strings and an integer cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(
                "{{\"cniVersion\":\"1.0.0\",\"code\":{},\"msg\":\"internal error\"}}",
                self.code
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_document_has_the_spec_fields() {
        let e = CniError::new(
            Code::SubnetExhausted,
            "no free address",
            "10.244.1.0/30 is full",
        )
        .in_version("0.4.0");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "cniVersion": "0.4.0",
                "code": 100,
                "msg": "no free address",
                "details": "10.244.1.0/30 is full",
            })
        );
        assert_eq!(
            CniError::new(Code::Io, "x", "y")
                .in_version("9.9.9")
                .cni_version,
            "1.0.0"
        );
    }
}
