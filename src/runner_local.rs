//! The `local` runner: every instance's sandbox lives on this machine.
//!
//! It only picks the environment for a spec; the environments own how a sandbox starts.

use crate::env::{self, EnvError, EnvSpec, Environment, InstanceDirs};
use crate::service::Runner;

/// Resource keys that cost one unit per instance unless the request names them.
const IMPLICIT_UNITS: &[&str] = &["instances"];

pub struct LocalRunner;

impl Runner for LocalRunner {
    fn name(&self) -> &'static str {
        "local"
    }

    fn implicit_units(&self) -> &'static [&'static str] {
        IMPLICIT_UNITS
    }

    fn start(&self, spec: &EnvSpec, dirs: &InstanceDirs) -> Result<Box<dyn Environment>, EnvError> {
        env::start(spec, dirs)
    }
}
