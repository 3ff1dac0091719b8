//! Identifiers: random UUIDs (version 4) for builds and microVMs.

/// A random version-4 UUID in its usual text form.
pub fn new_uuid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A new microVM: its API id (`microvm-<uuid>`, as the reference) and the
/// engine's shorter name for it (VM directory and socket paths must stay short).
pub fn new_microvm_ids() -> (String, String) {
    let uuid = new_uuid();
    let vm_name = crate::layout::microvm_vm_name(&uuid);
    (format!("microvm-{uuid}"), vm_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_shape() {
        let id = new_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(new_uuid(), id);
        let (api, vm) = new_microvm_ids();
        assert!(api.starts_with("microvm-") && api.len() == 44);
        assert!(hearth_vm::validate_name(&vm), "{vm}");
    }
}
