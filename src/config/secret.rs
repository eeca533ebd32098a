//! Secrets: `${env:NAME}` and `${file:PATH}` interpolation, and a type that never prints.

use std::fmt;

/// A resolved secret. `Debug` and `Display` print `***`; only [`Secret::expose`] reveals it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why a `${...}` reference could not be resolved, with the fix.
#[derive(Debug, PartialEq, Eq)]
pub struct InterpolationError {
    pub message: String,
    pub fix: String,
}

/// Replaces every `${env:NAME}` and `${file:PATH}` in `text`. A file's trailing newline is
/// dropped, as secret files written by `echo` or by orchestrators usually end with one.
pub fn interpolate(text: &str) -> Result<String, InterpolationError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| InterpolationError {
            message: format!("unterminated reference `{}`", &rest[start..]),
            fix: "close it with `}`, e.g. ${env:PGPASSWORD}".into(),
        })?;
        out.push_str(&resolve(&after[..end])?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn resolve(reference: &str) -> Result<String, InterpolationError> {
    match reference.split_once(':') {
        Some(("env", name)) => std::env::var(name).map_err(|_| InterpolationError {
            message: format!("environment variable {name} is not set (referenced as ${{env:{name}}})"),
            fix: format!("export {name}=... before running sluice, or read it from a file with ${{file:/path}}"),
        }),
        Some(("file", path)) => match std::fs::read_to_string(path) {
            Ok(s) => Ok(s.strip_suffix('\n').map(|s| s.strip_suffix('\r').unwrap_or(s)).unwrap_or(&s).to_string()),
            Err(e) => Err(InterpolationError {
                message: format!("cannot read secret file {path}: {e}"),
                fix: "check the path and that sluice may read it".into(),
            }),
        },
        _ => Err(InterpolationError {
            message: format!("unknown reference `${{{reference}}}`"),
            fix: "use ${env:NAME} or ${file:/path/to/secret}".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_file_references_resolve() {
        std::env::set_var("SLUICE_TEST_SECRET_A", "s3cr3t");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!("a=${{env:SLUICE_TEST_SECRET_A}} b=${{file:{}}}", file.display());
        assert_eq!(interpolate(&text).unwrap(), "a=s3cr3t b=from-file");
    }

    #[test]
    fn missing_variable_names_it_and_the_fix() {
        let err = interpolate("x ${env:SLUICE_TEST_SURELY_UNSET}").unwrap_err();
        assert!(err.message.contains("SLUICE_TEST_SURELY_UNSET is not set"), "{}", err.message);
        assert!(err.fix.contains("export SLUICE_TEST_SURELY_UNSET"));
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
    }
}
