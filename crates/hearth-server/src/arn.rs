//! Lambda ARNs of the resources hearth names: images (the caller's and the
//! operator's managed ones), microVMs and the managed network connectors.
//! One type parses and prints them all, so every ARN on the wire is made and
//! read the same way.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The account of managed resources (base images, network connectors).
pub const MANAGED_ACCOUNT: &str = "aws";
/// What follows `network-connector:` in a managed connector's ARN.
const CONNECTOR_OWNER: &str = "aws-network-connector";

/// `arn:aws:lambda:<region>:<account>:<resource>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Arn {
    pub region: String,
    /// An account id, or [`MANAGED_ACCOUNT`].
    pub account: String,
    pub resource: Resource,
}

/// What an [`Arn`] names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    /// `microvm-image:<name>`
    Image(String),
    /// `microvm:<id>`
    Microvm(String),
    /// `network-connector:aws-network-connector:<name>`
    NetworkConnector(String),
}

impl Arn {
    /// An image of `account`.
    pub fn image(region: &str, account: &str, name: &str) -> Self {
        Self::new(region, account, Resource::Image(name.to_string()))
    }

    /// A managed base image.
    pub fn managed_image(region: &str, name: &str) -> Self {
        Self::image(region, MANAGED_ACCOUNT, name)
    }

    /// A managed network connector (`HTTP_INGRESS`, `INTERNET_EGRESS`, ...).
    pub fn connector(region: &str, name: &str) -> Self {
        Self::new(
            region,
            MANAGED_ACCOUNT,
            Resource::NetworkConnector(name.to_string()),
        )
    }

    fn new(region: &str, account: &str, resource: Resource) -> Self {
        Self {
            region: region.to_string(),
            account: account.to_string(),
            resource,
        }
    }

    /// Reads a Lambda ARN of a kind hearth knows; anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("arn:aws:lambda:")?;
        let mut parts = rest.splitn(4, ':');
        let (region, account, kind, name) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if region.is_empty() || account.is_empty() || name.is_empty() {
            return None;
        }
        let resource = match kind {
            "microvm-image" => Resource::Image(name.to_string()),
            "microvm" => Resource::Microvm(name.to_string()),
            "network-connector" => {
                let name = name.strip_prefix(CONNECTOR_OWNER)?.strip_prefix(':')?;
                Resource::NetworkConnector(name.to_string())
            }
            _ => return None,
        };
        Some(Self::new(region, account, resource))
    }

    /// The name of an image of `account` in `region` this ARN names.
    pub fn image_of(&self, region: &str, account: &str) -> Option<&str> {
        match &self.resource {
            Resource::Image(name) if self.region == region && self.account == account => Some(name),
            _ => None,
        }
    }

    /// The id of a microVM of `account` in `region` this ARN names.
    pub fn microvm_of(&self, region: &str, account: &str) -> Option<&str> {
        match &self.resource {
            Resource::Microvm(id) if self.region == region && self.account == account => Some(id),
            _ => None,
        }
    }

    /// The name of a managed connector in `region` this ARN names.
    pub fn connector_in(&self, region: &str) -> Option<&str> {
        match &self.resource {
            Resource::NetworkConnector(name)
                if self.region == region && self.account == MANAGED_ACCOUNT =>
            {
                Some(name)
            }
            _ => None,
        }
    }

    /// The managed connector this ARN names, whatever its region.
    pub fn connector_name(&self) -> Option<&str> {
        match &self.resource {
            Resource::NetworkConnector(name) if self.account == MANAGED_ACCOUNT => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for Arn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "arn:aws:lambda:{}:{}:", self.region, self.account)?;
        match &self.resource {
            Resource::Image(name) => write!(f, "microvm-image:{name}"),
            Resource::Microvm(id) => write!(f, "microvm:{id}"),
            Resource::NetworkConnector(name) => {
                write!(f, "network-connector:{CONNECTOR_OWNER}:{name}")
            }
        }
    }
}

/// ARNs travel and are stored as their text.
impl Serialize for Arn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Arn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Arn::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("not a hearth Lambda ARN: {text}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns_print_as_the_reference_writes_them_and_parse_back() {
        let cases = [
            (
                Arn::image("us-east-1", "123456789012", "web"),
                "arn:aws:lambda:us-east-1:123456789012:microvm-image:web",
            ),
            (
                Arn::managed_image("eu-west-1", "debian-12"),
                "arn:aws:lambda:eu-west-1:aws:microvm-image:debian-12",
            ),
            (
                Arn::new(
                    "us-east-1",
                    "123456789012",
                    Resource::Microvm("microvm-1".into()),
                ),
                "arn:aws:lambda:us-east-1:123456789012:microvm:microvm-1",
            ),
            (
                Arn::connector("us-east-1", "HTTP_INGRESS"),
                "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:HTTP_INGRESS",
            ),
        ];
        for (arn, text) in cases {
            assert_eq!(arn.to_string(), text);
            assert_eq!(Arn::parse(text), Some(arn));
        }
    }

    #[test]
    fn foreign_and_malformed_arns_are_refused() {
        for bad in [
            "",
            "web",
            "arn:aws:iam::123456789012:role/x",
            "arn:aws:lambda:us-east-1:123456789012:function:f",
            "arn:aws:lambda:us-east-1:123456789012:microvm-image:",
            "arn:aws:lambda::123456789012:microvm-image:web",
            "arn:aws:lambda:us-east-1:aws:network-connector:HTTP_INGRESS",
        ] {
            assert_eq!(Arn::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn owners_and_regions_are_checked() {
        let arn = Arn::image("us-east-1", "111111111111", "web");
        assert_eq!(arn.image_of("us-east-1", "111111111111"), Some("web"));
        assert_eq!(arn.image_of("us-east-1", "222222222222"), None);
        assert_eq!(arn.image_of("eu-west-1", "111111111111"), None);
        assert_eq!(arn.microvm_of("us-east-1", "111111111111"), None);
        let connector = Arn::connector("us-east-1", "SHELL_INGRESS");
        assert_eq!(connector.connector_in("us-east-1"), Some("SHELL_INGRESS"));
        assert_eq!(connector.connector_in("eu-west-1"), None);
        assert_eq!(connector.connector_name(), Some("SHELL_INGRESS"));
        // A customer account cannot own a managed connector.
        let forged = Arn::parse(
            "arn:aws:lambda:us-east-1:111111111111:network-connector:aws-network-connector:X",
        )
        .expect("parses");
        assert_eq!(forged.connector_in("us-east-1"), None);
    }

    #[test]
    fn serde_uses_the_text() {
        let arn = Arn::managed_image("us-east-1", "debian-12");
        let json = serde_json::to_value(&arn).expect("serialise");
        assert_eq!(
            json,
            serde_json::json!("arn:aws:lambda:us-east-1:aws:microvm-image:debian-12")
        );
        assert_eq!(serde_json::from_value::<Arn>(json).expect("parse"), arn);
        assert!(serde_json::from_value::<Arn>(serde_json::json!("nope")).is_err());
    }
}
