//! The lifecycle state machines of the API's resources: images, image versions,
//! builds and microVMs. Each is an enum with the wire names of the model's enums
//! and the transitions the server may make; the store refuses any other
//! (a compare-and-set on the current state), so two requests racing on one
//! resource cannot both act.

use std::fmt;

/// Declares a state enum with its wire names.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

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
    /// `MicrovmState`: PENDING → RUNNING ⇄ SUSPENDING → SUSPENDED → … → TERMINATED.
    MicrovmState {
        Pending = "PENDING",
        Running = "RUNNING",
        Suspending = "SUSPENDING",
        Suspended = "SUSPENDED",
        Terminating = "TERMINATING",
        Terminated = "TERMINATED",
    }
}

impl MicrovmState {
    pub fn can_become(self, next: MicrovmState) -> bool {
        use MicrovmState::*;
        matches!(
            (self, next),
            (Pending, Running)
                | (Running, Suspending)
                | (Suspending, Suspended)
                // A suspend that fails leaves the VM running.
                | (Suspending, Running)
                // Resume: the reference shows PENDING briefly while resuming.
                | (Suspended, Pending)
                | (Pending | Running | Suspending | Suspended, Terminating)
                | (Terminating, Terminated)
        )
    }

    pub fn is_terminal(self) -> bool {
        self == MicrovmState::Terminated
    }

    /// States in which the VM holds memory against the account's quota.
    pub fn holds_memory(self) -> bool {
        !self.is_terminal()
    }
}

wire_enum! {
    /// `MicrovmImageState`.
    ImageState {
        Creating = "CREATING",
        Created = "CREATED",
        CreateFailed = "CREATE_FAILED",
        Updating = "UPDATING",
        Updated = "UPDATED",
        UpdateFailed = "UPDATE_FAILED",
        Deleting = "DELETING",
        DeleteFailed = "DELETE_FAILED",
        Deleted = "DELETED",
    }
}

impl ImageState {
    pub fn can_become(self, next: ImageState) -> bool {
        use ImageState::*;
        match next {
            Created | CreateFailed => self == Creating,
            Updated | UpdateFailed => self == Updating,
            // A new version can be added once the image is settled.
            Updating => matches!(self, Created | CreateFailed | Updated | UpdateFailed),
            Deleting => matches!(
                self,
                Created | CreateFailed | Updated | UpdateFailed | DeleteFailed
            ),
            Deleted | DeleteFailed => self == Deleting,
            Creating => false,
        }
    }

    /// Busy states: chained operations get a ConflictException.
    pub fn is_busy(self) -> bool {
        matches!(
            self,
            ImageState::Creating | ImageState::Updating | ImageState::Deleting
        )
    }
}

wire_enum! {
    /// `MicrovmImageVersionState`.
    VersionState {
        Pending = "PENDING",
        InProgress = "IN_PROGRESS",
        Successful = "SUCCESSFUL",
        Failed = "FAILED",
        Deleting = "DELETING",
        Deleted = "DELETED",
        DeleteFailed = "DELETE_FAILED",
    }
}

impl VersionState {
    pub fn can_become(self, next: VersionState) -> bool {
        use VersionState::*;
        match next {
            InProgress => self == Pending,
            Successful | Failed => matches!(self, Pending | InProgress),
            Deleting => matches!(self, Successful | Failed | DeleteFailed),
            Deleted | DeleteFailed => self == Deleting,
            Pending => false,
        }
    }
}

wire_enum! {
    /// `MicrovmImageVersionStatus`: whether new microVMs may run from a version.
    VersionStatus {
        Active = "ACTIVE",
        Inactive = "INACTIVE",
    }
}

wire_enum! {
    /// `BuildState`.
    BuildState {
        Pending = "PENDING",
        InProgress = "IN_PROGRESS",
        Successful = "SUCCESSFUL",
        Failed = "FAILED",
    }
}

impl BuildState {
    pub fn can_become(self, next: BuildState) -> bool {
        use BuildState::*;
        match next {
            InProgress => self == Pending,
            Successful | Failed => matches!(self, Pending | InProgress),
            Pending => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The enums carry exactly the model's wire values.
    #[test]
    fn wire_names_match_the_model() {
        let model = hearth_api::model();
        let check = |shape: &str, ours: Vec<&str>| {
            let mut theirs = model.shape(shape).expect("shape").enum_values.clone();
            let mut ours: Vec<String> = ours.into_iter().map(String::from).collect();
            theirs.sort();
            ours.sort();
            assert_eq!(ours, theirs, "{shape}");
        };
        check(
            "MicrovmState",
            MicrovmState::ALL.iter().map(|s| s.as_str()).collect(),
        );
        check(
            "MicrovmImageState",
            ImageState::ALL.iter().map(|s| s.as_str()).collect(),
        );
        check(
            "MicrovmImageVersionState",
            VersionState::ALL.iter().map(|s| s.as_str()).collect(),
        );
        check(
            "MicrovmImageVersionStatus",
            VersionStatus::ALL.iter().map(|s| s.as_str()).collect(),
        );
        check(
            "BuildState",
            BuildState::ALL.iter().map(|s| s.as_str()).collect(),
        );
        for state in MicrovmState::ALL {
            assert_eq!(MicrovmState::parse(state.as_str()), Some(*state));
        }
        assert_eq!(MicrovmState::parse("running"), None);
    }

    #[test]
    fn microvm_transitions() {
        use MicrovmState::*;
        let allowed = [
            (Pending, Running),
            (Running, Suspending),
            (Suspending, Suspended),
            (Suspending, Running),
            (Suspended, Pending),
            (Pending, Terminating),
            (Running, Terminating),
            (Suspending, Terminating),
            (Suspended, Terminating),
            (Terminating, Terminated),
        ];
        for from in MicrovmState::ALL {
            for to in MicrovmState::ALL {
                assert_eq!(
                    from.can_become(*to),
                    allowed.contains(&(*from, *to)),
                    "{from} -> {to}"
                );
            }
        }
        // Nothing leaves TERMINATED.
        assert!(MicrovmState::ALL
            .iter()
            .all(|to| !Terminated.can_become(*to)));
    }

    #[test]
    fn image_and_version_transitions() {
        use ImageState::*;
        assert!(Creating.can_become(Created));
        assert!(Creating.can_become(CreateFailed));
        assert!(!Created.can_become(Created));
        assert!(Created.can_become(Updating));
        assert!(!Updating.can_become(Updating));
        assert!(!Updating.can_become(Deleting));
        assert!(Updated.can_become(Deleting));
        assert!(Deleting.can_become(Deleted));
        assert!(!Deleted.can_become(Updating));
        assert!(Creating.is_busy() && !Created.is_busy());

        use VersionState as V;
        assert!(V::Pending.can_become(V::InProgress));
        assert!(V::InProgress.can_become(V::Successful));
        assert!(!V::Successful.can_become(V::InProgress));
        assert!(V::Successful.can_become(V::Deleting));
        assert!(!V::Deleted.can_become(V::Deleting));

        use BuildState as B;
        assert!(B::Pending.can_become(B::InProgress));
        assert!(!B::Failed.can_become(B::Successful));
    }
}
