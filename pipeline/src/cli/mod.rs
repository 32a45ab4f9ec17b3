//! One module per subcommand; each parses its flags and calls the library.

pub mod bench;
pub mod bench_scale;
pub mod build;
pub mod convert;
pub mod inspect;
