//! The operator's managed base images (ListManagedMicrovmImages,
//! ListManagedMicrovmImageVersions), read from the engine's image cache.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use hearth_api::{ApiError, ErrorCode};
use serde_json::{json, Value};

use super::input::Caller;
use super::page::paginate;
use crate::api::state::AppState;
use crate::arn::{Arn, MANAGED_ACCOUNT};
use crate::layout;

/// One build of a managed base image in the cache (`images/NAME/KEY/`).
#[derive(Debug, Clone)]
struct ManagedVersion {
    version: String,
    created: i64,
    current: bool,
}

#[derive(Debug, Clone)]
struct ManagedImage {
    name: String,
    versions: Vec<ManagedVersion>,
}

/// Reads the operator's base images from the cache (made by scripts/setup-host).
fn managed_images(images_dir: &Path) -> Vec<ManagedImage> {
    let Ok(entries) = std::fs::read_dir(images_dir) else {
        return Vec::new();
    };
    let mut images: Vec<ManagedImage> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || !entry.path().is_dir() {
                return None;
            }
            let versions = managed_versions(&entry.path());
            (!versions.is_empty()).then_some(ManagedImage { name, versions })
        })
        .collect();
    images.sort_by(|a, b| a.name.cmp(&b.name));
    images
}

fn managed_versions(image_dir: &Path) -> Vec<ManagedVersion> {
    let current: Option<PathBuf> = std::fs::read_link(image_dir.join("current")).ok();
    let Ok(entries) = std::fs::read_dir(image_dir) else {
        return Vec::new();
    };
    let mut builds: Vec<(i64, bool)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let text = name.to_string_lossy();
            if text.starts_with('.') || text == "current" {
                return None;
            }
            let manifest = entry.path().join("manifest.json");
            let created = std::fs::metadata(&manifest)
                .and_then(|m| m.modified())
                .ok()?
                .duration_since(UNIX_EPOCH)
                .ok()?
                .as_secs() as i64;
            let is_current = current
                .as_deref()
                .is_some_and(|c| c.as_os_str() == name.as_os_str());
            Some((created, is_current))
        })
        .collect();
    // Versions are numbered in the order the builds were made: 1.0, 2.0, ...
    builds.sort();
    builds
        .into_iter()
        .enumerate()
        .map(|(i, (created, current))| ManagedVersion {
            version: format!("{}.0", i + 1),
            created,
            current,
        })
        .collect()
}

/// Finds a managed image by name or managed ARN in the caller's region.
fn find_managed(
    state: &AppState,
    caller: &Caller,
    identifier: &str,
) -> Result<ManagedImage, ApiError> {
    let name = match identifier.strip_prefix("arn:") {
        Some(_) => Arn::parse(identifier)
            .and_then(|arn| {
                arn.image_of(&caller.region, MANAGED_ACCOUNT)
                    .map(str::to_string)
            })
            .unwrap_or_default(),
        None => identifier.to_string(),
    };
    managed_images(&layout::managed_images_dir(&state.assets))
        .into_iter()
        .find(|image| image.name == name && !name.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::ResourceNotFound,
                format!("Managed MicroVM image {identifier} not found"),
            )
        })
}

pub(super) fn list_managed_images(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let images = managed_images(&layout::managed_images_dir(&state.assets));
    let rows: Vec<(String, Value)> = images
        .iter()
        .map(|image| {
            let created = image.versions.iter().map(|v| v.created).min().unwrap_or(0);
            let updated = image.versions.iter().map(|v| v.created).max().unwrap_or(0);
            (
                image.name.clone(),
                json!({
                    "imageArn": Arn::managed_image(&caller.region, &image.name),
                    "createdAt": created,
                    "updatedAt": updated,
                }),
            )
        })
        .collect();
    paginate(rows, input, 50)
}

pub(super) fn list_managed_image_versions(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let identifier = input["imageIdentifier"].as_str().unwrap_or_default();
    let image = find_managed(state, caller, identifier)?;
    let arn = Arn::managed_image(&caller.region, &image.name);
    let rows = image
        .versions
        .iter()
        .map(|v| {
            (
                // Sort key: zero-padded so 10.0 follows 9.0.
                format!(
                    "{:012}",
                    v.version.trim_end_matches(".0").parse::<u64>().unwrap_or(0)
                ),
                json!({
                    "imageArn": arn,
                    "imageVersion": v.version,
                    "status": if v.current { "AVAILABLE" } else { "DEPRECATED" },
                    "supportedCpuConfigurations": [{"architecture": "X86_64"}],
                    "createdAt": v.created,
                    "updatedAt": v.created,
                }),
            )
        })
        .collect();
    paginate(rows, input, 50)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagination_is_keyset_and_stable() {
        let rows = |keys: &[&str]| -> Vec<(String, Value)> {
            keys.iter()
                .map(|k| (k.to_string(), json!({ "k": k })))
                .collect()
        };
        let first = paginate(rows(&["a", "b", "c"]), &json!({"maxResults": 2}), 50).expect("page");
        assert_eq!(first["items"].as_array().map(Vec::len), Some(2));
        let token = first["nextToken"].as_str().expect("token").to_string();
        // A row inserted before the cursor does not shift the next page.
        let second = paginate(
            rows(&["a", "aa", "b", "c"]),
            &json!({"maxResults": 2, "nextToken": token}),
            50,
        )
        .expect("page");
        assert_eq!(second["items"], json!([{ "k": "c" }]));
        assert!(second.get("nextToken").is_none());
        assert!(paginate(rows(&["a"]), &json!({"nextToken": "garbage!"}), 50).is_err());
    }

    /// Handler outputs match the model's output shapes, so they cannot drift.
    #[test]
    fn outputs_match_the_model() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("images/debian-12/k1");
        std::fs::create_dir_all(&image).expect("mkdir");
        std::fs::write(image.join("manifest.json"), "{}").expect("write");
        std::os::unix::fs::symlink("k1", dir.path().join("images/debian-12/current"))
            .expect("link");
        let state = AppState::for_tests(dir.path());
        let caller = Caller {
            account_id: "123456789012".into(),
            region: "us-east-1".into(),
        };
        let model = hearth_api::model();
        let images = list_managed_images(&state, &caller, &json!({})).expect("images");
        let op = model.operation("ListManagedMicrovmImages").expect("op");
        model.check_output(op, &images).expect("images output");
        assert_eq!(images["items"].as_array().map(Vec::len), Some(1));
        let versions = list_managed_image_versions(
            &state,
            &caller,
            &json!({"imageIdentifier": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12"}),
        )
        .expect("versions");
        let op = model
            .operation("ListManagedMicrovmImageVersions")
            .expect("op");
        model.check_output(op, &versions).expect("versions output");
        assert_eq!(versions["items"][0]["status"], "AVAILABLE");
        // Another region's ARN does not name it.
        assert!(list_managed_image_versions(
            &state,
            &caller,
            &json!({"imageIdentifier": "arn:aws:lambda:eu-west-1:aws:microvm-image:debian-12"}),
        )
        .is_err());
    }

    #[test]
    fn managed_versions_follow_build_order_and_current_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("images/debian-12");
        for key in ["old", "new"] {
            std::fs::create_dir_all(image.join(key)).expect("mkdir");
            std::fs::write(image.join(key).join("manifest.json"), "{}").expect("write");
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        std::os::unix::fs::symlink("new", image.join("current")).expect("link");
        let images = managed_images(&dir.path().join("images"));
        assert_eq!(images.len(), 1);
        let versions = &images[0].versions;
        assert_eq!(versions.len(), 2);
        assert_eq!(
            (versions[0].version.as_str(), versions[0].current),
            ("1.0", false)
        );
        assert_eq!(
            (versions[1].version.as_str(), versions[1].current),
            ("2.0", true)
        );
    }
}
