//! The CNI plugin (spec 1.0.0): the command dispatch and the error format.

use std::io::Write;

/// A CNI error result (code, msg, details), printed on stdout.
#[derive(Debug, serde::Serialize)]
pub struct CniError {
    /// The CNI version of the error document.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Error code (1-99 are the spec's, 100+ the plugin's).
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Details.
    pub details: String,
}

/// Runs one CNI invocation; returns the process exit code.
pub fn main_with(command: Option<&str>, out: &mut impl Write) -> i32 {
    match command {
        Some("VERSION") => {
            let doc = serde_json::json!({
                "cniVersion": "1.0.0",
                "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"],
            });
            let _ = writeln!(out, "{doc}");
            0
        }
        other => {
            let err = CniError {
                cni_version: "1.0.0".into(),
                code: 4,
                msg: format!("unsupported CNI_COMMAND {:?}", other.unwrap_or("")),
                details: "canal-cni supports VERSION".into(),
            };
            let _ = writeln!(out, "{}", serde_json::to_string(&err).unwrap_or_default());
            1
        }
    }
}
