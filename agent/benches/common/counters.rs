//! Sets of `u64` counters a bench reads before and after a run to check which way its connections
//! went.

/// Declares a struct of `u64` counters (`Debug, Clone, Copy, Default, PartialEq, Eq`) with a
/// `delta(self, before)` that subtracts field by field.
macro_rules! counters {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $($(#[$fmeta:meta])* $fvis:vis $field:ident,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        $vis struct $name {
            $($(#[$fmeta])* $fvis $field: u64,)*
        }

        impl $name {
            /// What each counter moved by since `before`.
            pub fn delta(self, before: $name) -> $name {
                $name {
                    $($field: self.$field - before.$field,)*
                }
            }

            /// Field by field sum: what one process shows when it plays two roles.
            // Not every bench that declares counters has such a process.
            #[allow(dead_code)]
            pub fn plus(self, other: $name) -> $name {
                $name {
                    $($field: self.$field + other.$field,)*
                }
            }
        }
    };
}

pub(crate) use counters;
