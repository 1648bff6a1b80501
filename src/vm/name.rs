use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::Error;

/// A VM name: `fr-` and 8 lowercase hex digits. It names the per-VM directory, the serial log, the tap
/// and the Forgejo runner, and is how the sweep recognises our leftovers (and only ours).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

impl VmName {
    pub const PREFIX: &'static str = "fr-";

    /// A fresh random name.
    pub fn generate() -> Self {
        let n: u32 = rand::thread_rng().gen();
        Self(format!("{}{n:08x}", Self::PREFIX))
    }

    /// Accepts exactly `fr-` + 8 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let ok = s.strip_prefix(Self::PREFIX).is_some_and(|h| {
            h.len() == 8 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(Error::InvalidName(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for VmName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl TryFrom<String> for VmName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::parse(&s)
    }
}

impl From<VmName> for String {
    fn from(n: VmName) -> String {
        n.0
    }
}

impl AsRef<str> for VmName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_parse_and_fit_an_interface_name() {
        for _ in 0..100 {
            let n = VmName::generate();
            assert_eq!(VmName::parse(n.as_str()).unwrap(), n);
            assert!(n.as_str().len() <= 15);
        }
    }

    #[test]
    fn parse_rejects_everything_else() {
        for bad in [
            "",
            "fr-",
            "fr-1234567",
            "fr-123456789",
            "fr-ABCDEF12",
            "xx-12345678",
            "fr-1234567g",
            "fr-../../a",
        ] {
            assert!(VmName::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(VmName::parse("fr-0123abcd").is_ok());
    }
}
