//! The Hugging Face hub's naming: model ids (`org/name`, optionally `@revision`) found in the
//! local cache as `huggingface_hub` lays it out, and `hf://org/name[@revision]` read from
//! the hub (or a mirror) over HTTP(S).
//!
//! The cache: `$HF_HUB_CACHE` (else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) holds
//! `models--org--name/` with `refs/<revision>` (a file holding a commit hash),
//! `snapshots/<commit>/` (the repository's files, as symlinks into `blobs/`) and `blobs/`.
//! The hub: `{HF_ENDPOINT or https://huggingface.co}/org/name/resolve/<revision>/<file>`;
//! a token (`HF_TOKEN`, else the file `$HF_HOME/token`) goes to the endpoint's host only.

use crate::error::{Error, Result};
use std::io;
use std::path::{Path, PathBuf};

/// A model repository and revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelId {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit (default `main`).
    pub revision: String,
}

impl ModelId {
    /// Reads `org/name` or `org/name@revision`; `None` for anything else (a path with more
    /// or fewer components, or characters a repository name cannot have).
    pub fn parse(text: &str) -> Option<ModelId> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() && !rev.contains(['/', '\\']) => (repo, rev),
            Some(_) => return None,
            None => (text, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let part = |p: &str| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (part(org) && part(name)).then(|| ModelId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The repository's folder in the cache: `models--org--name`.
    fn cache_folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

/// Where the hub cache is: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else
/// `HF_HOME/hub`, else `~/.cache/huggingface/hub` (environment read through `env`).
pub fn cache_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(dir) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return Some(PathBuf::from(dir));
    }
    Some(hf_home(env)?.join("hub"))
}

/// `HF_HOME`, else `XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(home) = env("HF_HOME") {
        return Some(PathBuf::from(home));
    }
    if let Some(cache) = env("XDG_CACHE_HOME") {
        return Some(PathBuf::from(cache).join("huggingface"));
    }
    Some(
        PathBuf::from(env("HOME")?)
            .join(".cache")
            .join("huggingface"),
    )
}

/// The snapshot directory of `id` in the cache at `cache`: `refs/<revision>` names the
/// commit (a revision that is itself a commit needs no ref).
pub fn cached_snapshot(cache: &Path, id: &ModelId) -> Result<PathBuf> {
    let repo = cache.join(id.cache_folder());
    let not_cached = |why: String| {
        Error::Io(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "not a local path, and model {} (revision {}) is not in the Hugging Face cache at {}: {why}",
                id.repo,
                id.revision,
                cache.display()
            ),
        ))
    };
    let commit = match std::fs::read_to_string(repo.join("refs").join(&id.revision)) {
        Ok(text) => text.trim().to_string(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => id.revision.clone(),
        Err(e) => return Err(not_cached(format!("reading refs/{}: {e}", id.revision))),
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return Err(not_cached(format!("refs/{} holds no commit", id.revision)));
    }
    let snapshot = repo.join("snapshots").join(&commit);
    if snapshot.is_dir() {
        Ok(snapshot)
    } else {
        Err(not_cached(format!("no snapshot {commit}")))
    }
}

/// The hub's base URL: `HF_ENDPOINT` (without a trailing slash), else the public hub.
pub fn endpoint(env: &dyn Fn(&str) -> Option<String>) -> String {
    env("HF_ENDPOINT")
        .map(|e| e.trim_end_matches('/').to_string())
        .unwrap_or_else(|| "https://huggingface.co".to_string())
}

/// The user's hub token: `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the
/// first line of `$HF_HOME/token`, as `huggingface_hub` stores it after `hf auth login`.
pub fn token(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    if let Some(token) = env("HF_TOKEN").or_else(|| env("HUGGING_FACE_HUB_TOKEN")) {
        return Some(token);
    }
    let text = std::fs::read_to_string(hf_home(env)?.join("token")).ok()?;
    let token = text.lines().next()?.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// The HTTP(S) prefix `hf://org/name[@revision]` resolves to at `endpoint`:
/// `{endpoint}/org/name/resolve/{revision}`.
pub fn resolve_url(hf_url: &str, endpoint: &str) -> Result<(ModelId, String)> {
    let rest = hf_url
        .get(5..)
        .filter(|_| crate::location::has_scheme(hf_url, "hf://"))
        .ok_or_else(|| Error::InvalidLocation {
            reason: "not an hf:// URL".into(),
        })?;
    let id = ModelId::parse(rest.trim_end_matches('/')).ok_or_else(|| Error::InvalidLocation {
        reason: format!("hf://{rest}: expected hf://org/name or hf://org/name@revision"),
    })?;
    let url = format!("{endpoint}/{}/resolve/{}", id.repo, id.revision);
    Ok((id, url))
}

/// The process environment, as the functions here read it (empty values count as unset).
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn model_ids() {
        let id = ModelId::parse("Qwen/Qwen3-30B-A3B").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("Qwen/Qwen3-30B-A3B", "main")
        );
        let id = ModelId::parse("org/name@v1.0").unwrap();
        assert_eq!(id.revision, "v1.0");
        for not in [
            "name",
            "a/b/c",
            "./x",
            "/abs/path",
            "org/",
            "org/na me",
            "org/x@",
            "../x",
            "o/x@a/b",
        ] {
            assert!(ModelId::parse(not).is_none(), "{not}");
        }
    }

    #[test]
    fn cache_endpoint_and_token_from_the_environment() {
        let e = env(&[("HF_HOME", "/h")]);
        assert_eq!(cache_dir(&e).unwrap(), PathBuf::from("/h/hub"));
        assert_eq!(
            cache_dir(&env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h")])).unwrap(),
            PathBuf::from("/c")
        );
        assert_eq!(
            cache_dir(&env(&[("HOME", "/home/u")])).unwrap(),
            PathBuf::from("/home/u/.cache/huggingface/hub")
        );
        assert_eq!(endpoint(&env(&[])), "https://huggingface.co");
        assert_eq!(
            endpoint(&env(&[("HF_ENDPOINT", "http://m:1/")])),
            "http://m:1"
        );
        let (id, url) = resolve_url("hf://org/m@dev", "http://m:1").unwrap();
        assert_eq!(
            (id.revision.as_str(), url.as_str()),
            ("dev", "http://m:1/org/m/resolve/dev")
        );
        assert!(resolve_url("hf://justname", "http://m").is_err());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_secret\n").unwrap();
        let home = dir.path().to_str().unwrap();
        assert_eq!(
            token(&env(&[("HF_HOME", home)])).as_deref(),
            Some("hf_secret")
        );
        assert_eq!(
            token(&env(&[("HF_HOME", home), ("HF_TOKEN", "t")])).as_deref(),
            Some("t")
        );
        assert_eq!(token(&env(&[("HF_HOME", "/nonexistent")])), None);
    }

    #[test]
    fn snapshots_through_refs() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--m");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        let id = ModelId::parse("org/m").unwrap();
        assert_eq!(
            cached_snapshot(cache.path(), &id).unwrap(),
            repo.join("snapshots/abc123")
        );
        let by_commit = ModelId::parse("org/m@abc123").unwrap();
        assert_eq!(
            cached_snapshot(cache.path(), &by_commit).unwrap(),
            repo.join("snapshots/abc123")
        );
        let err = cached_snapshot(cache.path(), &ModelId::parse("org/other").unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("org/other"), "{err}");
    }
}
