//! One module per subcommand; each parses its flags and calls the library.

pub mod build;
pub mod convert;
