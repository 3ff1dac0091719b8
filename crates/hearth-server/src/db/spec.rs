//! What an image version and a microVM were asked to be, as typed values:
//! parsed once from the validated API input, stored as JSON in their rows
//! (the wire's camelCase member names, so rows written before these types
//! existed read the same), echoed back by the API, and interpreted only
//! through the methods here (hooks, idle policy, connectors, environment).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::arn::Arn;

/// Default `resources[0].minimumMemoryInMiB` (the reference's).
pub const DEFAULT_MEMORY_MIB: u32 = 2048;
/// Default `readyTimeoutInSeconds` and `validateTimeoutInSeconds` (the reference's).
const DEFAULT_IMAGE_HOOK_TIMEOUT: u64 = 30;
/// Default timeout of the runtime hooks (the reference's), and their bounds.
const DEFAULT_RUNTIME_HOOK_TIMEOUT: u64 = 1;
const RUNTIME_HOOK_TIMEOUTS: std::ops::RangeInclusive<u64> = 1..=60;

/// The frozen members of CreateMicrovmImage/UpdateMicrovmImage that the
/// version keeps (and the API echoes).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    pub base_image_arn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_image_version: Option<String>,
    pub build_role_arn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub code_artifact: CodeArtifact,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_network_connectors: Option<Vec<Arn>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_configurations: Option<Vec<CpuConfiguration>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<Resources>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub additional_os_capabilities: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment_variables: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CodeArtifact {
    #[serde(default)]
    pub uri: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CpuConfiguration {
    pub architecture: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    #[serde(rename = "minimumMemoryInMiB")]
    pub minimum_memory_in_mib: u32,
}

/// Where a microVM's or an image's logs go (a union: one member is set).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Logging {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<LoggingDisabled>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_watch: Option<CloudWatchLogging>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoggingDisabled {}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudWatchLogging {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_stream: Option<String>,
}

impl ImageSpec {
    /// The memory its build and its microVMs get, in MiB.
    pub fn memory_mib(&self) -> u32 {
        self.resources
            .as_deref()
            .and_then(<[Resources]>::first)
            .map_or(DEFAULT_MEMORY_MIB, |r| r.minimum_memory_in_mib)
    }

    /// The managed base image name its ARN names, in any region.
    pub fn base_image_name(&self) -> Option<String> {
        Arn::parse(&self.base_image_arn).and_then(|arn| {
            arn.image_of(&arn.region, crate::arn::MANAGED_ACCOUNT)
                .map(str::to_string)
        })
    }

    /// Whether its build VMs may reach the internet.
    pub fn internet_egress(&self) -> bool {
        connects(self.egress_network_connectors.as_deref(), "INTERNET_EGRESS")
    }

    /// Its environment variables, in name order.
    pub fn environment(&self) -> impl Iterator<Item = (&str, &str)> {
        self.environment_variables
            .iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Whether a connector list names the managed connector `name`.
fn connects(list: Option<&[Arn]>, name: &str) -> bool {
    list.into_iter()
        .flatten()
        .any(|arn| arn.connector_name() == Some(name))
}

/// The app's lifecycle hooks: a port inside the guest and which hooks are on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub microvm_hooks: Option<MicrovmHooks>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub microvm_image_hooks: Option<MicrovmImageHooks>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HookState {
    Enabled,
    Disabled,
}

/// The hooks called on a microVM's changes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmHooks {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<HookState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_timeout_in_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<HookState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_timeout_in_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspend: Option<HookState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspend_timeout_in_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminate: Option<HookState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminate_timeout_in_seconds: Option<u64>,
}

/// The hooks called while an image is built.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmImageHooks {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<HookState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_timeout_in_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validate: Option<HookState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validate_timeout_in_seconds: Option<u64>,
}

/// A hook called on a microVM's change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeHook {
    Run,
    Resume,
    Suspend,
    Terminate,
}

impl RuntimeHook {
    pub const ALL: [RuntimeHook; 4] = [Self::Run, Self::Resume, Self::Suspend, Self::Terminate];

    /// Its name in the hook's path (`/aws/lambda-microvms/runtime/v1/<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::Resume => "resume",
            Self::Suspend => "suspend",
            Self::Terminate => "terminate",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|hook| hook.name() == name)
    }
}

/// A hook called while an image is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageHook {
    Ready,
    Validate,
}

impl ImageHook {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Validate => "validate",
        }
    }
}

/// An enabled hook: where to call it and how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookCall {
    pub name: &'static str,
    pub port: u16,
    pub timeout: Duration,
}

impl Hooks {
    fn runtime_state(&self, hook: RuntimeHook) -> (Option<HookState>, Option<u64>) {
        let Some(h) = &self.microvm_hooks else {
            return (None, None);
        };
        match hook {
            RuntimeHook::Run => (h.run, h.run_timeout_in_seconds),
            RuntimeHook::Resume => (h.resume, h.resume_timeout_in_seconds),
            RuntimeHook::Suspend => (h.suspend, h.suspend_timeout_in_seconds),
            RuntimeHook::Terminate => (h.terminate, h.terminate_timeout_in_seconds),
        }
    }

    fn image_state(&self, hook: ImageHook) -> (Option<HookState>, Option<u64>) {
        let Some(h) = &self.microvm_image_hooks else {
            return (None, None);
        };
        match hook {
            ImageHook::Ready => (h.ready, h.ready_timeout_in_seconds),
            ImageHook::Validate => (h.validate, h.validate_timeout_in_seconds),
        }
    }

    pub fn runtime_enabled(&self, hook: RuntimeHook) -> bool {
        self.runtime_state(hook).0 == Some(HookState::Enabled)
    }

    pub fn image_enabled(&self, hook: ImageHook) -> bool {
        self.image_state(hook).0 == Some(HookState::Enabled)
    }

    /// A runtime hook to call, when enabled and a port is set (default
    /// timeout 1 s, at most 60 s, as the reference).
    pub fn runtime(&self, hook: RuntimeHook) -> Option<HookCall> {
        let (state, seconds) = self.runtime_state(hook);
        if state != Some(HookState::Enabled) {
            return None;
        }
        let seconds = seconds
            .unwrap_or(DEFAULT_RUNTIME_HOOK_TIMEOUT)
            .clamp(*RUNTIME_HOOK_TIMEOUTS.start(), *RUNTIME_HOOK_TIMEOUTS.end());
        Some(HookCall {
            name: hook.name(),
            port: self.port?,
            timeout: Duration::from_secs(seconds),
        })
    }

    /// How long a build waits for an image hook (default 30 s).
    pub fn image_timeout(&self, hook: ImageHook) -> Duration {
        Duration::from_secs(
            self.image_state(hook)
                .1
                .unwrap_or(DEFAULT_IMAGE_HOOK_TIMEOUT),
        )
    }

    /// What the model cannot check: runtime hooks need the ready hook, and
    /// enabled hooks need a port.
    pub fn check(&self) -> Result<(), HooksError> {
        let runtime = RuntimeHook::ALL
            .into_iter()
            .any(|hook| self.runtime_enabled(hook));
        let ready = self.image_enabled(ImageHook::Ready);
        if runtime && !ready {
            return Err(HooksError::RuntimeWithoutReady);
        }
        let any = runtime || ready || self.image_enabled(ImageHook::Validate);
        if any && self.port.is_none() {
            return Err(HooksError::NoPort);
        }
        Ok(())
    }
}

/// Hooks an image cannot have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HooksError {
    #[error("Enabling any microvmHooks requires microvmImageHooks.ready to be ENABLED")]
    RuntimeWithoutReady,
    #[error("Enabled hooks require hooks.port")]
    NoPort,
}

/// What RunMicrovm asked for, with the image's hooks frozen in.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmSpec {
    pub maximum_duration_in_seconds: u64,
    #[serde(default)]
    pub ingress_network_connectors: Vec<Arn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_network_connectors: Option<Vec<Arn>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_role_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_policy: Option<IdlePolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_hook_payload: Option<String>,
    /// The image's hooks (not echoed by the API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
}

impl MicrovmSpec {
    /// The runtime hook to call on a change, when the image enabled it.
    pub fn hook(&self, hook: RuntimeHook) -> Option<HookCall> {
        self.hooks.as_ref()?.runtime(hook)
    }

    /// The port the app's hooks listen on, if any.
    pub fn hooks_port(&self) -> Option<u16> {
        self.hooks.as_ref()?.port
    }

    /// Whether the microVM reaches the internet: `INTERNET_EGRESS` yes,
    /// `NO_EGRESS` no, neither (omitted or empty) the operator's default.
    pub fn egress(&self, default: bool) -> bool {
        let list = self.egress_network_connectors.as_deref();
        if connects(list, "NO_EGRESS") {
            false
        } else if connects(list, "INTERNET_EGRESS") {
            true
        } else {
            default
        }
    }

    /// Whether `NO_INGRESS` was asked for: the endpoint refuses every request.
    pub fn no_ingress(&self) -> bool {
        connects(Some(&self.ingress_network_connectors), "NO_INGRESS")
    }

    /// Whether `SHELL_INGRESS` was asked for (shell tokens and the agent API).
    pub fn shell_ingress(&self) -> bool {
        connects(Some(&self.ingress_network_connectors), "SHELL_INGRESS")
    }

    /// Whether endpoint traffic resumes it when SUSPENDED.
    pub fn auto_resume(&self) -> bool {
        self.idle_policy.is_some_and(|p| p.auto_resume_enabled)
    }
}

/// When an idle microVM is suspended, and a suspended one ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdlePolicy {
    pub max_idle_duration_seconds: u64,
    pub suspended_duration_seconds: u64,
    pub auto_resume_enabled: bool,
}

impl IdlePolicy {
    pub fn max_idle_ms(&self) -> i64 {
        seconds_to_ms(self.max_idle_duration_seconds)
    }

    pub fn suspended_ms(&self) -> i64 {
        seconds_to_ms(self.suspended_duration_seconds)
    }
}

fn seconds_to_ms(seconds: u64) -> i64 {
    i64::try_from(seconds)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000)
}

/// What a successful build's snapshot takes on disk: `snapshotBuild` on the
/// wire, stored as that JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSizes {
    pub memory_snapshot_size_in_bytes: u64,
    pub disk_snapshot_size_in_bytes: u64,
    pub code_install_size_in_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A CreateMicrovmImage input with every member the version keeps.
    fn full_image() -> serde_json::Value {
        json!({
            "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
            "baseImageVersion": "1.0",
            "buildRoleArn": "arn:aws:iam::123456789012:role/build",
            "description": "web app",
            "codeArtifact": {"uri": "s3://bucket/app.zip"},
            "logging": {"cloudWatch": {"logGroup": "g", "logStream": "s"}},
            "egressNetworkConnectors": ["arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:INTERNET_EGRESS"],
            "cpuConfigurations": [{"architecture": "X86_64"}],
            "resources": [{"minimumMemoryInMiB": 512}],
            "additionalOsCapabilities": ["ALL"],
            "hooks": {
                "port": 8080,
                "microvmHooks": {"run": "ENABLED", "runTimeoutInSeconds": 5, "suspend": "DISABLED"},
                "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 90, "validate": "ENABLED"}
            },
            "environmentVariables": {"B": "2", "A": "1"}
        })
    }

    #[test]
    fn image_specs_round_trip_the_wire_form() {
        let input = full_image();
        let spec: ImageSpec = serde_json::from_value(input.clone()).expect("parse");
        assert_eq!(serde_json::to_value(&spec).expect("serialise"), input);
        assert_eq!(spec.memory_mib(), 512);
        assert!(spec.internet_egress());
        assert_eq!(spec.base_image_name().as_deref(), Some("debian-12"));
        assert_eq!(
            spec.environment().collect::<Vec<_>>(),
            [("A", "1"), ("B", "2")]
        );
    }

    #[test]
    fn image_spec_defaults() {
        let spec: ImageSpec = serde_json::from_value(json!({
            "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
            "buildRoleArn": "arn:aws:iam::123456789012:role/build",
            "codeArtifact": {"uri": "s3://b/k"},
            // Not kept: the request's other members.
            "name": "web", "clientToken": "t", "tags": {"k": "v"}
        }))
        .expect("parse");
        assert_eq!(spec.memory_mib(), DEFAULT_MEMORY_MIB);
        assert!(!spec.internet_egress());
        assert_eq!(spec.environment().count(), 0);
        assert!(spec.hooks.is_none());
        // Absent members stay absent in the stored and echoed form.
        assert_eq!(
            serde_json::to_value(&spec).expect("serialise"),
            json!({
                "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
                "buildRoleArn": "arn:aws:iam::123456789012:role/build",
                "codeArtifact": {"uri": "s3://b/k"}
            })
        );
        let empty = ImageSpec {
            resources: Some(Vec::new()),
            ..spec
        };
        assert_eq!(empty.memory_mib(), DEFAULT_MEMORY_MIB);
    }

    /// Rows written before the typed specs (by `hearth image import`) read.
    #[test]
    fn stored_import_specs_read() {
        let stored = r#"{"baseImageArn":"arn:aws:lambda:us-east-1:aws:microvm-image:imported-rootfs","buildRoleArn":"arn:aws:iam::123456789012:role/hearth-operator-import","codeArtifact":{"uri":"file:///tmp/rootfs"},"cpuConfigurations":[{"architecture":"X86_64"}],"hooks":{"microvmHooks":{"run":"ENABLED","runTimeoutInSeconds":3},"microvmImageHooks":{"ready":"ENABLED","readyTimeoutInSeconds":60},"port":8080},"resources":[{"minimumMemoryInMiB":256}]}"#;
        let spec: ImageSpec = serde_json::from_str(stored).expect("parse");
        assert_eq!(spec.memory_mib(), 256);
        let hooks = spec.hooks.expect("hooks");
        assert_eq!(
            hooks.image_timeout(ImageHook::Ready),
            Duration::from_secs(60)
        );
        assert_eq!(
            hooks.runtime(RuntimeHook::Run),
            Some(HookCall {
                name: "run",
                port: 8080,
                timeout: Duration::from_secs(3)
            })
        );
    }

    #[test]
    fn runtime_hooks_need_enabled_and_a_port() {
        let hooks: Hooks = serde_json::from_value(json!({
            "port": 9000,
            "microvmHooks": {"run": "ENABLED", "suspend": "ENABLED", "suspendTimeoutInSeconds": 600,
                             "resume": "DISABLED", "resumeTimeoutInSeconds": 5},
            "microvmImageHooks": {"ready": "ENABLED"}
        }))
        .expect("parse");
        let call = |hook| hooks.runtime(hook).map(|c| (c.port, c.timeout.as_secs()));
        assert_eq!(call(RuntimeHook::Run), Some((9000, 1)), "default 1 s");
        assert_eq!(call(RuntimeHook::Suspend), Some((9000, 60)), "at most 60 s");
        assert_eq!(call(RuntimeHook::Resume), None, "disabled");
        assert_eq!(call(RuntimeHook::Terminate), None, "absent");
        assert_eq!(
            hooks.image_timeout(ImageHook::Ready),
            Duration::from_secs(30)
        );
        assert!(!hooks.image_enabled(ImageHook::Validate));
        let portless = Hooks {
            port: None,
            ..hooks
        };
        assert_eq!(portless.runtime(RuntimeHook::Run), None);
        assert_eq!(
            RuntimeHook::parse("terminate"),
            Some(RuntimeHook::Terminate)
        );
        assert_eq!(RuntimeHook::parse("ready"), None);
    }

    #[test]
    fn hook_rules() {
        let parse = |value| serde_json::from_value::<Hooks>(value).expect("parse");
        assert_eq!(parse(json!({})).check(), Ok(()));
        assert_eq!(
            parse(json!({"port": 1, "microvmHooks": {"run": "ENABLED"}})).check(),
            Err(HooksError::RuntimeWithoutReady)
        );
        assert_eq!(
            parse(json!({"microvmImageHooks": {"validate": "ENABLED"}})).check(),
            Err(HooksError::NoPort)
        );
        assert_eq!(
            parse(json!({"port": 1, "microvmHooks": {"run": "ENABLED"},
                         "microvmImageHooks": {"ready": "ENABLED"}}))
            .check(),
            Ok(())
        );
        // Disabled hooks need nothing.
        assert_eq!(
            parse(json!({"microvmHooks": {"run": "DISABLED"}})).check(),
            Ok(())
        );
        assert!(serde_json::from_value::<Hooks>(json!({"port": 70000})).is_err());
        assert!(serde_json::from_value::<Hooks>(json!({"microvmHooks": {"run": "ON"}})).is_err());
    }

    #[test]
    fn microvm_specs_round_trip_and_interpret() {
        let stored = json!({
            "maximumDurationInSeconds": 3600,
            "ingressNetworkConnectors": [
                "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:HTTP_INGRESS",
                "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:SHELL_INGRESS"
            ],
            "executionRoleArn": "arn:aws:iam::123456789012:role/run",
            "idlePolicy": {"maxIdleDurationSeconds": 60, "suspendedDurationSeconds": 0, "autoResumeEnabled": true},
            "logging": {"disabled": {}},
            "runHookPayload": "hello",
            "hooks": {"port": 8080, "microvmHooks": {"terminate": "ENABLED"}}
        });
        let spec: MicrovmSpec = serde_json::from_value(stored.clone()).expect("parse");
        assert_eq!(serde_json::to_value(&spec).expect("serialise"), stored);
        assert!(spec.shell_ingress());
        assert!(spec.auto_resume());
        assert_eq!(spec.hooks_port(), Some(8080));
        assert!(spec.hook(RuntimeHook::Terminate).is_some());
        assert!(spec.hook(RuntimeHook::Run).is_none());
        let policy = spec.idle_policy.expect("policy");
        assert_eq!((policy.max_idle_ms(), policy.suspended_ms()), (60_000, 0));

        let bare: MicrovmSpec =
            serde_json::from_value(json!({"maximumDurationInSeconds": 5})).expect("parse");
        assert!(!bare.shell_ingress() && !bare.auto_resume());
        assert_eq!(
            (bare.hooks_port(), bare.hook(RuntimeHook::Run)),
            (None, None)
        );
    }

    #[test]
    fn egress_follows_the_connectors_then_the_operators_default() {
        let arn = |name: &str| {
            format!("arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:{name}")
        };
        let spec = |egress: serde_json::Value, ingress: serde_json::Value| -> MicrovmSpec {
            let mut value =
                json!({"maximumDurationInSeconds": 5, "ingressNetworkConnectors": ingress});
            if !egress.is_null() {
                value["egressNetworkConnectors"] = egress;
            }
            serde_json::from_value(value).expect("parse")
        };
        let none = spec(serde_json::Value::Null, json!([]));
        assert!(none.egress(true) && !none.egress(false));
        let empty = spec(json!([]), json!([]));
        assert!(empty.egress(true) && !empty.egress(false));
        let internet = spec(json!([arn("INTERNET_EGRESS")]), json!([]));
        assert!(internet.egress(false));
        let closed = spec(json!([arn("NO_EGRESS")]), json!([]));
        assert!(!closed.egress(true));
        assert!(!closed.no_ingress());
        let shut = spec(serde_json::Value::Null, json!([arn("NO_INGRESS")]));
        assert!(shut.no_ingress());
    }

    #[test]
    fn huge_idle_durations_saturate() {
        let policy = IdlePolicy {
            max_idle_duration_seconds: u64::MAX,
            suspended_duration_seconds: 1,
            auto_resume_enabled: false,
        };
        assert_eq!(policy.max_idle_ms(), i64::MAX);
        assert_eq!(policy.suspended_ms(), 1000);
    }
}
