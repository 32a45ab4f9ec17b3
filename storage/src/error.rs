//! What can go wrong, each naming the object (its full URL) and, for credentials, the variables.

use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A URL we cannot open (unknown scheme, no bucket, bad configuration).
    #[error("{url}: {message}")]
    Location { url: String, message: String },
    /// The object does not exist (a shard listed by the manifest, the manifest itself).
    #[error("{object}: not found")]
    Missing { object: String },
    /// The object is not the one the manifest (or the first read) described.
    #[error("{object}: changed since it was listed ({detail}); rebuild or re-sync it")]
    Changed { object: String, detail: String },
    /// The store refused or lacked credentials; `hint` names the variables involved.
    #[error("{object}: credentials refused or missing: {hint} ({source})")]
    Credentials {
        object: String,
        hint: String,
        source: object_store::Error,
    },
    /// Put-if-absent found a different object already there.
    #[error("{object}: already exists with other contents (a different build wrote here)")]
    Exists { object: String },
    /// Anything else the store reported, after its retries.
    #[error("{object}: {source}")]
    Store {
        object: String,
        source: object_store::Error,
    },
    /// Local I/O (the cache directory).
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl StorageError {
    /// Classifies an object_store error about `object` of a `scheme` location.
    pub(crate) fn from_store(object: String, scheme: &str, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => StorageError::Missing { object },
            object_store::Error::Precondition { .. } => StorageError::Changed {
                object,
                detail: "its ETag differs from the one first read".into(),
            },
            e @ (object_store::Error::Unauthenticated { .. }
            | object_store::Error::PermissionDenied { .. }) => StorageError::Credentials {
                object,
                hint: credential_hint(scheme),
                source: e,
            },
            // Credential providers (instance metadata, token files) fail as `Generic`.
            e @ object_store::Error::Generic { store, .. }
                if store.eq_ignore_ascii_case("s3") && looks_like_credentials(&e) =>
            {
                StorageError::Credentials {
                    object,
                    hint: credential_hint(scheme),
                    source: e,
                }
            }
            source => StorageError::Store { object, source },
        }
    }
}

fn looks_like_credentials(e: &object_store::Error) -> bool {
    let text = format!("{e:?}").to_ascii_lowercase();
    text.contains("credential") || text.contains("metadata") || text.contains("token")
}

fn set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

/// Which credential variables of `scheme`'s cloud are set, and which are missing.
pub(crate) fn credential_hint(scheme: &str) -> String {
    let (vars, fallback): (&[&str], &str) = match scheme {
        "s3" | "s3a" => (
            &[
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN",
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            ],
            "without them the EC2 instance metadata service is asked",
        ),
        "gs" => (
            &[
                "GOOGLE_APPLICATION_CREDENTIALS",
                "GOOGLE_SERVICE_ACCOUNT",
                "GOOGLE_SERVICE_ACCOUNT_KEY",
            ],
            "without them the GCE metadata server is asked",
        ),
        "az" | "azure" | "abfs" | "abfss" | "adl" => (
            &[
                "AZURE_STORAGE_ACCOUNT_NAME",
                "AZURE_STORAGE_ACCOUNT_KEY",
                "AZURE_STORAGE_SAS_KEY",
                "AZURE_CLIENT_ID",
                "AZURE_CLIENT_SECRET",
                "AZURE_TENANT_ID",
                "AZURE_FEDERATED_TOKEN_FILE",
            ],
            "without them the Azure instance metadata service is asked",
        ),
        _ => return "this location takes no credentials".into(),
    };
    let (present, absent): (Vec<&str>, Vec<&str>) = vars.iter().partition(|v| set(v));
    let mut out = String::new();
    if !present.is_empty() {
        out += &format!("refused: {} (set)", present.join(", "));
    }
    if !absent.is_empty() {
        if !out.is_empty() {
            out += "; ";
        }
        out += &format!("not set: {}", absent.join(", "));
    }
    if present.is_empty() {
        out += &format!("; {fallback}");
    }
    out
}
