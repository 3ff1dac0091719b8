//! Helpers shared by hearth-vm's guest tests.

use hearth_proto::ExecRequest;
use hearth_vm::AgentClient;

/// Runs `sh -c script` in the guest, fails the test unless it exits 0, and
/// returns its stdout, trimmed.
pub async fn sh(agent: &AgentClient, script: &str) -> String {
    let out = agent
        .exec_output(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .expect("exec");
    assert_eq!(
        out.status.code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
