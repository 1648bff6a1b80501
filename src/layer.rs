//! Configuration layers: partial structs whose fields are all optional, one per config section, and
//! the one rule that combines them: a later layer's set fields win, field by field.
//!
//! `serve` merges the config file, the environment and its flags this way (`controller::config`);
//! the operator commands merge the file's directory keys and their flags ([`crate::paths`]).
//!
//! This module is a leaf: it imports nothing from the crate.

/// A partial value that a later layer can override.
pub trait Merge {
    /// `self` with every field that `over` sets taken from `over`.
    fn merge(self, over: Self) -> Self;
}

impl<T> Merge for Option<T> {
    fn merge(self, over: Self) -> Self {
        over.or(self)
    }
}

/// Serialises a set field as its value; used by `layer!` so that a field whose resolved value
/// is itself optional (`Some(None)`) is left out of a TOML document like an unset one.
pub fn serialize_set<T, S>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error>
where
    T: serde::Serialize,
    S: serde::Serializer,
{
    match value {
        Some(v) => v.serialize(s),
        None => s.serialize_none(),
    }
}

/// Declares a layer struct and implements [`Merge`] for it: every field is merged with
/// [`Merge::merge`] (an `Option` takes the later value if set; a nested layer merges field by
/// field).
///
/// `struct Layer for Full { … }`: every field is `Option<T>`, where `T` is the type of `Full`'s
/// field of the same name, `Full` has no other field, and the layer derives `Serialize` (each
/// field is written with [`serialize_set`]). The macro then also writes
/// `Layer::resolve(self, base: Full) -> Full` (each set field replaces `base`'s) and
/// `From<Full> for Layer` (every field set: the resolved value as a layer, e.g. to print it). Both
/// name every field, so a field added to `Full` but not to the layer does not compile.
macro_rules! layer {
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident for $full:ident {
            $( $(#[$fattr:meta])* $fvis:vis $field:ident : Option<$ty:ty> ),* $(,)?
        }
    ) => {
        $(#[$attr])*
        $vis struct $name {
            $(
                $(#[$fattr])*
                #[serde(serialize_with = "crate::layer::serialize_set")]
                $fvis $field: Option<$ty>,
            )*
        }

        impl crate::layer::Merge for $name {
            fn merge(self, over: Self) -> Self {
                Self { $( $field: crate::layer::Merge::merge(self.$field, over.$field) ),* }
            }
        }

        impl $name {
            /// `base` with each field this layer sets replaced.
            pub fn resolve(self, base: $full) -> $full {
                $full { $( $field: self.$field.unwrap_or(base.$field) ),* }
            }
        }

        impl From<$full> for $name {
            fn from(full: $full) -> Self {
                Self { $( $field: Some(full.$field) ),* }
            }
        }
    };
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$fattr:meta])* $fvis:vis $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$attr])*
        $vis struct $name {
            $( $(#[$fattr])* $fvis $field: $ty, )*
        }

        impl crate::layer::Merge for $name {
            fn merge(self, over: Self) -> Self {
                Self { $( $field: crate::layer::Merge::merge(self.$field, over.$field) ),* }
            }
        }
    };
}

pub(crate) use layer;

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq)]
    struct Full {
        a: u32,
        b: Option<String>,
    }

    layer! {
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        struct Part for Full {
            a: Option<u32>,
            b: Option<Option<String>>,
        }
    }

    layer! {
        #[derive(Debug, Clone, Default, PartialEq)]
        struct Outer {
            x: Option<u8>,
            part: Part,
        }
    }

    #[test]
    fn later_set_fields_win_field_by_field() {
        let low = Outer {
            x: Some(1),
            part: Part {
                a: Some(1),
                b: Some(Some("low".into())),
            },
        };
        let high = Outer {
            x: None,
            part: Part {
                a: Some(2),
                b: None,
            },
        };
        let m = low.merge(high);
        assert_eq!(m.x, Some(1));
        assert_eq!(m.part.a, Some(2));
        assert_eq!(m.part.b, Some(Some("low".into())));
    }

    #[test]
    fn resolve_and_back() {
        let base = Full {
            a: 7,
            b: Some("base".into()),
        };
        let p = Part {
            a: None,
            b: Some(None),
        };
        assert_eq!(p.resolve(base.clone()), Full { a: 7, b: None });
        assert_eq!(Part::default().resolve(base.clone()), base);
        let back = Part::from(Full { a: 3, b: None });
        assert_eq!(back.a, Some(3));
        // A resolved `None` is simply absent from the TOML form.
        assert_eq!(toml::to_string(&back).unwrap(), "a = 3\n");
        let text = toml::to_string(&Part::from(base.clone())).unwrap();
        assert_eq!(
            toml::from_str::<Part>(&text).unwrap().resolve(base.clone()),
            base
        );
    }
}
