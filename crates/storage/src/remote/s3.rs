//! S3: where the endpoint is, in which region, as whom, and presigned request URLs.
//!
//! Requests are SigV4-presigned by `rusty-s3` (the signature covers the host only, so one
//! scheme serves every byte range) and sent by the same HTTP client as plain URLs.

use crate::error::S3ConfigError;
use rusty_s3::actions::{GetObject, ListObjectsV2, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// How long a presigned request stays valid. Each request is signed just before it is
/// sent, so this only needs to cover clock skew and a slow first byte.
const PRESIGN_FOR: Duration = Duration::from_secs(15 * 60);

/// Where and as whom to reach S3 or an S3-compatible store.
#[derive(Debug, Clone)]
pub struct S3Config {
    endpoint: Url,
    path_style: bool,
    region: String,
    credentials: Option<Credentials>,
}

impl S3Config {
    /// A configuration for `endpoint` (e.g. `http://127.0.0.1:9000`, path-style requests)
    /// or, with `None`, AWS itself (`https://s3.REGION.amazonaws.com`, virtual-hosted
    /// requests). Without credentials requests are unsigned (public buckets).
    pub fn new(
        endpoint: Option<&str>,
        region: &str,
        credentials: Option<(String, String, Option<String>)>,
    ) -> Result<S3Config, S3ConfigError> {
        let (endpoint, path_style) = match endpoint {
            Some(e) => (e.to_string(), true),
            None => (format!("https://s3.{region}.amazonaws.com"), false),
        };
        let invalid = |reason: String| S3ConfigError::Endpoint {
            endpoint: endpoint.clone(),
            reason,
        };
        let parsed: Url = endpoint
            .parse()
            .map_err(|e: url::ParseError| invalid(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(invalid("not an http(s) URL with a host".into()));
        }
        let endpoint = parsed;
        Ok(S3Config {
            endpoint,
            path_style,
            region: region.to_string(),
            credentials: credentials.map(|(key, secret, token)| match token {
                Some(token) => Credentials::new_with_token(key, secret, token),
                None => Credentials::new(key, secret),
            }),
        })
    }

    /// Reads the configuration the way AWS tools do:
    ///
    /// - credentials from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and
    ///   `AWS_SESSION_TOKEN`), else from the profile (`AWS_PROFILE`, default `default`) in
    ///   the credentials file (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`)
    ///   or the config file (`AWS_CONFIG_FILE`, default `~/.aws/config`); none at all means
    ///   unsigned requests;
    /// - the region from `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`, else
    ///   `us-east-1`;
    /// - the endpoint from `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the profile's
    ///   `endpoint_url`, else AWS.
    pub fn from_env() -> Result<S3Config, S3ConfigError> {
        S3Config::from_lookup(&|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// [`S3Config::from_env`] with variables looked up through `env`.
    pub fn from_lookup(env: &dyn Fn(&str) -> Option<String>) -> Result<S3Config, S3ConfigError> {
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let home = env("HOME").map(PathBuf::from);
        let file = |var: &str, default: &str| {
            env(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
        };
        let credentials_file = load_ini(file("AWS_SHARED_CREDENTIALS_FILE", "credentials"))?;
        let config_file = load_ini(file("AWS_CONFIG_FILE", "config"))?;
        // In the config file, profiles other than `default` are `[profile NAME]`.
        let config_section = if profile == "default" {
            "default".to_string()
        } else {
            format!("profile {profile}")
        };
        let from_files = |key: &str| {
            let get = |ini: &Option<ini::Ini>, section: &str| {
                ini.as_ref()?
                    .get_from(Some(section), key)
                    .map(str::to_string)
            };
            get(&credentials_file, &profile).or_else(|| get(&config_file, &config_section))
        };

        let credentials = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(key), Some(secret)) => Some((key, secret, env("AWS_SESSION_TOKEN"))),
            _ => match (
                from_files("aws_access_key_id"),
                from_files("aws_secret_access_key"),
            ) {
                (Some(key), Some(secret)) => Some((key, secret, from_files("aws_session_token"))),
                _ => None,
            },
        };
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| from_files("region"))
            .unwrap_or_else(|| "us-east-1".into());
        let endpoint = env("AWS_ENDPOINT_URL_S3")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| from_files("endpoint_url"));
        S3Config::new(endpoint.as_deref(), &region, credentials)
    }

    /// The endpoint requests go to.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// The region requests are signed for.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Whether requests are signed (credentials were found).
    pub fn signed(&self) -> bool {
        self.credentials.is_some()
    }

    fn bucket(&self, name: &str) -> Result<Bucket, S3ConfigError> {
        let style = if self.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        Bucket::new(
            self.endpoint.clone(),
            style,
            name.to_string(),
            self.region.clone(),
        )
        .map_err(|e| S3ConfigError::Bucket {
            bucket: name.to_string(),
            reason: format!("{e:?} (endpoint {})", self.endpoint),
        })
    }

    /// A presigned GET of `key`.
    pub(super) fn presign_get(&self, bucket: &str, key: &str) -> Result<Url, S3ConfigError> {
        let bucket = self.bucket(bucket)?;
        Ok(GetObject::new(&bucket, self.credentials.as_ref(), key).sign(PRESIGN_FOR))
    }

    /// A presigned ListObjectsV2 of the objects directly under `prefix`.
    pub(super) fn presign_list(
        &self,
        bucket: &str,
        prefix: &str,
        continuation: Option<&str>,
    ) -> Result<Url, S3ConfigError> {
        let bucket = self.bucket(bucket)?;
        let mut list = ListObjectsV2::new(&bucket, self.credentials.as_ref());
        list.with_prefix(prefix);
        list.with_delimiter("/");
        if let Some(token) = continuation {
            list.with_continuation_token(token);
        }
        Ok(list.sign(PRESIGN_FOR))
    }
}

/// An INI file, or `None` when it does not exist.
fn load_ini(path: Option<PathBuf>) -> Result<Option<ini::Ini>, S3ConfigError> {
    let Some(path) = path.filter(|p| p.is_file()) else {
        return Ok(None);
    };
    ini::Ini::load_from_file(&path)
        .map(Some)
        .map_err(|e| S3ConfigError::ProfileFile {
            reason: e.to_string(),
            path,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn environment_wins_over_files() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = FILESECRET\n",
        )
        .unwrap();
        let creds = creds.to_str().unwrap();
        let c = S3Config::from_lookup(&lookup(&[
            ("AWS_SHARED_CREDENTIALS_FILE", creds),
            ("AWS_ACCESS_KEY_ID", "ENVKEY"),
            ("AWS_SECRET_ACCESS_KEY", "ENVSECRET"),
            ("AWS_REGION", "eu-west-3"),
        ]))
        .unwrap();
        assert_eq!(c.credentials.as_ref().unwrap().key(), "ENVKEY");
        assert_eq!(c.region(), "eu-west-3");
        assert_eq!(c.endpoint(), "https://s3.eu-west-3.amazonaws.com/");
        assert!(!c.path_style);
    }

    #[test]
    fn profiles_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let aws = dir.path().join(".aws");
        std::fs::create_dir(&aws).unwrap();
        std::fs::write(
            aws.join("credentials"),
            "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\
             [work]\naws_access_key_id = W\naws_secret_access_key = WS\naws_session_token = T\n",
        )
        .unwrap();
        std::fs::write(
            aws.join("config"),
            "[default]\nregion = us-west-2\n\
             [profile work]\nregion = ap-south-1\nendpoint_url = http://127.0.0.1:9000\n",
        )
        .unwrap();
        let home = dir.path().to_str().unwrap();
        let c = S3Config::from_lookup(&lookup(&[("HOME", home)])).unwrap();
        assert_eq!(c.credentials.as_ref().unwrap().key(), "D");
        assert_eq!(c.region(), "us-west-2");
        assert!(!c.path_style);

        let c = S3Config::from_lookup(&lookup(&[("HOME", home), ("AWS_PROFILE", "work")])).unwrap();
        let creds = c.credentials.as_ref().unwrap();
        assert_eq!((creds.key(), creds.token()), ("W", Some("T")));
        assert_eq!(c.region(), "ap-south-1");
        assert_eq!(c.endpoint(), "http://127.0.0.1:9000/");
        assert!(c.path_style);
        let url = c.presign_get("bucket", "dir/a b.safetensors").unwrap();
        assert!(
            url.as_str()
                .starts_with("http://127.0.0.1:9000/bucket/dir/a%20b.safetensors?")
        );
        assert!(url.query().unwrap().contains("X-Amz-Signature="));
    }

    #[test]
    fn anonymous_without_credentials() {
        let c =
            S3Config::from_lookup(&lookup(&[("AWS_ENDPOINT_URL", "http://localhost:1")])).unwrap();
        assert!(!c.signed());
        let url = c.presign_get("bucket", "k").unwrap();
        assert_eq!(url.as_str(), "http://localhost:1/bucket/k");
        assert!(S3Config::from_lookup(&lookup(&[("AWS_ENDPOINT_URL", "ftp://x")])).is_err());
    }
}
