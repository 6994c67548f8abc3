//! Credentials, region and endpoint "the AWS way": environment variables first, then the named
//! profile of the shared files (`~/.aws/credentials`, `~/.aws/config`), as the AWS CLI and SDKs
//! read them.
//!
//! Precedence (the AWS one):
//! - keys: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`) when both are
//!   set; else the profile's `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`
//!   from the credentials file, else from the config file. Keys are taken as a set from one
//!   place, never mixed.
//! - region: `AWS_REGION`, `AWS_DEFAULT_REGION`, then the profile's `region` (config file, then
//!   credentials file).
//! - endpoint: `AWS_ENDPOINT_URL`, then the profile's `endpoint_url`.
//! - profile: `AWS_PROFILE`, `AWS_DEFAULT_PROFILE`, else `default`. Files:
//!   `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`, sections `[NAME]`) and
//!   `AWS_CONFIG_FILE` (default `~/.aws/config`, sections `[profile NAME]`, and `[default]`).
//!
//! A profile named explicitly (`AWS_PROFILE`) that neither file has is an error naming it and
//! both files; a missing `default` profile is not (the keys may come from the environment).
//! Secrets never appear in an error, a log line or `Debug` output.

use anyhow::bail;
use std::collections::HashMap;
use std::path::PathBuf;

/// What the environment and the profile say, resolved by the AWS precedence.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AwsSettings {
    /// The profile used (also when it gave nothing).
    pub profile: String,
    /// `(access key id, secret access key, session token)`.
    pub keys: Option<(String, String, Option<String>)>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    /// Where the keys came from (`environment`, or a file's path and the profile).
    pub keys_from: Option<String>,
}

impl std::fmt::Debug for AwsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsSettings")
            .field("profile", &self.profile)
            .field(
                "access_key_id",
                &self.keys.as_ref().map(|(id, _, _)| id.as_str()),
            )
            .field(
                "secret_access_key",
                &self.keys.as_ref().map(|_| "<redacted>"),
            )
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("keys_from", &self.keys_from)
            .finish()
    }
}

/// Sections of an AWS shared file: section name -> key -> value. Keys are lower-cased;
/// indented lines under a key with no value (nested settings such as `s3 =`) are skipped.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section: Option<String> = None;
    for line in text.lines() {
        let indented = line.starts_with(' ') || line.starts_with('\t');
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            let name = name.trim().to_string();
            out.entry(name.clone()).or_default();
            section = Some(name);
            continue;
        }
        if indented {
            continue;
        }
        let (Some(s), Some((k, v))) = (&section, l.split_once('=')) else {
            continue;
        };
        out.entry(s.clone())
            .or_default()
            .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    out
}

/// A shared file: its path and its sections (none if it does not exist).
struct SharedFile {
    path: PathBuf,
    exists: bool,
    sections: HashMap<String, HashMap<String, String>>,
}

impl SharedFile {
    fn read(path: PathBuf) -> anyhow::Result<SharedFile> {
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(SharedFile {
                path,
                exists: true,
                sections: parse_ini(&t),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SharedFile {
                path,
                exists: false,
                sections: HashMap::new(),
            }),
            Err(e) => bail!("cannot read the AWS file {}: {e}", path.display()),
        }
    }

    fn describe(&self) -> String {
        if self.exists {
            self.path.display().to_string()
        } else {
            format!("{} (missing)", self.path.display())
        }
    }
}

fn keys_of(s: &HashMap<String, String>) -> Option<(String, String, Option<String>)> {
    let id = s.get("aws_access_key_id").filter(|v| !v.is_empty())?;
    let secret = s.get("aws_secret_access_key").filter(|v| !v.is_empty())?;
    let token = s
        .get("aws_session_token")
        .filter(|v| !v.is_empty())
        .cloned();
    Some((id.clone(), secret.clone(), token))
}

/// Resolves the settings from the process environment and the shared files.
pub fn resolve() -> anyhow::Result<AwsSettings> {
    resolve_with(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// [`resolve`] with `env` for the environment (tests give their own).
pub fn resolve_with(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<AwsSettings> {
    let named = env("AWS_PROFILE").or_else(|| env("AWS_DEFAULT_PROFILE"));
    let profile = named.clone().unwrap_or_else(|| "default".to_string());
    let home = env("HOME").map(PathBuf::from);
    let path_of = |var: &str, name: &str| -> Option<PathBuf> {
        env(var)
            .map(PathBuf::from)
            .or_else(|| home.as_deref().map(|h| h.join(".aws").join(name)))
    };
    let creds = match path_of("AWS_SHARED_CREDENTIALS_FILE", "credentials") {
        Some(p) => Some(SharedFile::read(p)?),
        None => None,
    };
    let config = match path_of("AWS_CONFIG_FILE", "config") {
        Some(p) => Some(SharedFile::read(p)?),
        None => None,
    };
    let cred_section = creds.as_ref().and_then(|f| f.sections.get(&profile));
    let config_section = config.as_ref().and_then(|f| {
        f.sections.get(&format!("profile {profile}")).or_else(|| {
            (profile == "default")
                .then(|| f.sections.get("default"))
                .flatten()
        })
    });
    if named.is_some() && cred_section.is_none() && config_section.is_none() {
        let looked: Vec<String> = [&creds, &config]
            .into_iter()
            .flatten()
            .map(|f| f.describe())
            .collect();
        bail!(
            "AWS profile '{profile}' (AWS_PROFILE) is in none of the AWS files: looked in {}",
            if looked.is_empty() {
                "nothing (no HOME, AWS_SHARED_CREDENTIALS_FILE or AWS_CONFIG_FILE)".to_string()
            } else {
                looked.join(" and ")
            }
        );
    }
    let mut out = AwsSettings {
        profile: profile.clone(),
        ..Default::default()
    };
    if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        out.keys = Some((id, secret, env("AWS_SESSION_TOKEN")));
        out.keys_from = Some("environment".into());
    } else if let Some(k) = cred_section.and_then(keys_of) {
        out.keys = Some(k);
        out.keys_from = creds
            .as_ref()
            .map(|f| format!("{} [{profile}]", f.path.display()));
    } else if let Some(k) = config_section.and_then(keys_of) {
        out.keys = Some(k);
        out.keys_from = config
            .as_ref()
            .map(|f| format!("{} [profile {profile}]", f.path.display()));
    }
    let from_profile = |key: &str| {
        config_section
            .and_then(|s| s.get(key))
            .or_else(|| cred_section.and_then(|s| s.get(key)))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    out.region = env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| from_profile("region"));
    out.endpoint = env("AWS_ENDPOINT_URL").or_else(|| from_profile("endpoint_url"));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(vars: &'a [(&'a str, String)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }

    fn files(creds: &str, config: &str) -> (tempfile::TempDir, String, String) {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("credentials");
        let f = d.path().join("config");
        std::fs::write(&c, creds).unwrap();
        std::fs::write(&f, config).unwrap();
        (d, c.display().to_string(), f.display().to_string())
    }

    #[test]
    fn a_named_profile_gives_keys_region_and_endpoint() {
        let (_d, c, f) = files(
            "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\n\
             # a comment\n[dev]\naws_access_key_id=K\naws_secret_access_key = S\n\
             aws_session_token = T\n",
            "[default]\nregion = us-east-1\n[profile dev]\nregion = garage\n\
             endpoint_url = http://127.0.0.1:3900\ns3 =\n  addressing_style = path\n",
        );
        let vars = [
            ("AWS_PROFILE", "dev".to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", c),
            ("AWS_CONFIG_FILE", f),
        ];
        let s = resolve_with(env_of(&vars)).unwrap();
        assert_eq!(s.keys, Some(("K".into(), "S".into(), Some("T".into()))));
        assert_eq!(s.region.as_deref(), Some("garage"));
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert!(
            !format!("{s:?}").contains("\"S\""),
            "Debug shows the secret"
        );
    }

    #[test]
    fn environment_variables_win_over_the_profile_and_keys_are_not_mixed() {
        let (_d, c, f) = files(
            "[default]\naws_access_key_id = D\naws_secret_access_key = DS\naws_session_token = DT\n",
            "[default]\nregion = eu\nendpoint_url = http://profile\n",
        );
        let vars = [
            ("AWS_SHARED_CREDENTIALS_FILE", c.clone()),
            ("AWS_CONFIG_FILE", f.clone()),
            ("AWS_ACCESS_KEY_ID", "E".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "ES".to_string()),
            ("AWS_REGION", "env-region".to_string()),
        ];
        let s = resolve_with(env_of(&vars)).unwrap();
        // The environment's keys without a token: the profile's token is not taken with them.
        assert_eq!(s.keys, Some(("E".into(), "ES".into(), None)));
        assert_eq!(s.region.as_deref(), Some("env-region"));
        assert_eq!(s.endpoint.as_deref(), Some("http://profile"));
        let only_files = [("AWS_SHARED_CREDENTIALS_FILE", c), ("AWS_CONFIG_FILE", f)];
        let s = resolve_with(env_of(&only_files)).unwrap();
        assert_eq!(s.keys, Some(("D".into(), "DS".into(), Some("DT".into()))));
        assert_eq!(s.region.as_deref(), Some("eu"));
    }

    #[test]
    fn a_missing_named_profile_is_an_error_naming_it_and_the_files() {
        let (_d, c, f) = files("[default]\n", "[profile other]\n");
        let vars = [
            ("AWS_PROFILE", "nosuch".to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", c.clone()),
            ("AWS_CONFIG_FILE", f.clone() + ".gone"),
        ];
        let e = resolve_with(env_of(&vars)).unwrap_err().to_string();
        assert!(e.contains("'nosuch'"), "{e}");
        assert!(e.contains(&c), "{e}");
        assert!(e.contains(&format!("{f}.gone (missing)")), "{e}");
        // The default profile may be missing: keys may come from elsewhere.
        let vars = [("AWS_SHARED_CREDENTIALS_FILE", c), ("AWS_CONFIG_FILE", f)];
        assert_eq!(resolve_with(env_of(&vars)).unwrap().keys, None);
    }
}
