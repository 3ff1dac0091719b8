//! Why an image build failed, as a failed build's `stateReason` says it: one
//! of the reference's build error codes, then a text for people.
//!
//! Every step of a build (the artifact fetch, the extraction, the Dockerfile
//! steps, the app's start and snapshot) reports its failure as a
//! [`BuildFailure`]; its `Display` is the only place the `CODE: detail` wire
//! text is written.

use std::fmt;
use std::time::Duration;

/// Declares the code enum with its wire names, as the server's state enums are.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($wire => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// The reference's build error codes. The model has no enum for them (they
    /// only start a failed build's `stateReason`); the list is the reference's
    /// documented one (BEHAVIOUR.md, "Build error codes").
    BuildErrorCode {
        S3AccessDenied = "S3_ACCESS_DENIED",
        S3NoSuchKey = "S3_NO_SUCH_KEY",
        S3NoSuchBucket = "S3_NO_SUCH_BUCKET",
        S3InvalidObject = "S3_INVALID_OBJECT",
        S3CrossRegionAccessDenied = "S3_CROSS_REGION_ACCESS_DENIED",
        ArchiveDockerfileNotFound = "ARCHIVE_DOCKERFILE_NOT_FOUND",
        ArchiveInvalid = "ARCHIVE_INVALID",
        ContainerBuildFailed = "CONTAINER_BUILD_FAILED",
        DiskStorageFull = "DISK_STORAGE_FULL",
        InternalPlatformError = "INTERNAL_PLATFORM_ERROR",
    }
}

/// The image lifecycle hooks a build waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildHook {
    Ready,
    Validate,
}

/// A failed build: what the build row's `stateReason` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildFailure {
    /// `None` for the failures the reference reports by their text alone
    /// (a hook timeout: "Ready hook invocation timed out after PT5M").
    pub code: Option<BuildErrorCode>,
    pub detail: String,
}

impl BuildFailure {
    pub fn new(code: BuildErrorCode, detail: impl Into<String>) -> BuildFailure {
        BuildFailure {
            code: Some(code),
            detail: detail.into(),
        }
    }

    /// The app did not pass `hook` within `timeout`, in the reference's words.
    pub fn hook_timed_out(hook: BuildHook, timeout: Duration) -> BuildFailure {
        let name = match hook {
            BuildHook::Ready => "Ready",
            BuildHook::Validate => "Validate",
        };
        BuildFailure {
            code: None,
            detail: format!(
                "{name} hook invocation timed out after PT{}S",
                timeout.as_secs()
            ),
        }
    }
}

/// The wire text: `CODE: detail`, or the detail alone when it has no code.
impl fmt::Display for BuildFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{code}: {}", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes are exactly the reference's list (BEHAVIOUR.md, "Build error codes").
    #[test]
    fn codes_are_the_references() {
        let mut ours: Vec<&str> = BuildErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        ours.sort_unstable();
        let mut reference = vec![
            "S3_ACCESS_DENIED",
            "S3_NO_SUCH_KEY",
            "S3_NO_SUCH_BUCKET",
            "S3_INVALID_OBJECT",
            "S3_CROSS_REGION_ACCESS_DENIED",
            "ARCHIVE_DOCKERFILE_NOT_FOUND",
            "ARCHIVE_INVALID",
            "CONTAINER_BUILD_FAILED",
            "DISK_STORAGE_FULL",
            "INTERNAL_PLATFORM_ERROR",
        ];
        reference.sort_unstable();
        assert_eq!(ours, reference);
        for code in BuildErrorCode::ALL {
            assert_eq!(BuildErrorCode::parse(code.as_str()), Some(*code));
        }
        assert_eq!(BuildErrorCode::parse("container_build_failed"), None);
    }

    /// Should the model ever gain an enum of build error codes, ours must match it.
    #[test]
    fn codes_match_any_model_enum_of_them() {
        for shape in crate::model().shapes() {
            if shape
                .enum_values
                .iter()
                .any(|v| v == BuildErrorCode::ContainerBuildFailed.as_str())
            {
                let mut theirs = shape.enum_values.clone();
                theirs.sort_unstable();
                let mut ours: Vec<String> = BuildErrorCode::ALL
                    .iter()
                    .map(|c| c.as_str().to_string())
                    .collect();
                ours.sort_unstable();
                assert_eq!(ours, theirs);
            }
        }
    }

    #[test]
    fn wire_text() {
        assert_eq!(
            BuildFailure::new(
                BuildErrorCode::ContainerBuildFailed,
                "step 2/3 (line 4) RUN x: boom"
            )
            .to_string(),
            "CONTAINER_BUILD_FAILED: step 2/3 (line 4) RUN x: boom"
        );
        assert_eq!(
            BuildFailure::hook_timed_out(BuildHook::Ready, Duration::from_secs(300)).to_string(),
            "Ready hook invocation timed out after PT300S"
        );
        assert_eq!(
            BuildFailure::hook_timed_out(BuildHook::Validate, Duration::from_secs(2)).to_string(),
            "Validate hook invocation timed out after PT2S"
        );
    }
}
