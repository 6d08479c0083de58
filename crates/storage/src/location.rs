//! Naming where bytes are: a local path or a URL, never one disguised as the other.

use std::fmt;
use std::path::{Path, PathBuf};

/// A local path, or a URL (`http://`, `https://`, `s3://`, `hf://`) kept as text: a URL is
/// never carried in a [`PathBuf`], where joining and normalising would mangle it. A local
/// path that does not exist but reads as a model id (`org/name`) is looked up in the Hugging
/// Face cache when opened (see [`crate::hub`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A path on a local (or network-mounted) filesystem.
    Local(PathBuf),
    /// A URL.
    Url(String),
}

/// URL schemes this crate knows.
const SCHEMES: [&str; 4] = ["http://", "https://", "s3://", "hf://"];

/// Whether `text` starts with `scheme`, ignoring ASCII case.
pub(crate) fn has_scheme(text: &str, scheme: &str) -> bool {
    text.get(..scheme.len())
        .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
}

impl Location {
    /// Reads `text` as a URL when it starts with a known scheme (`http://`, `https://`,
    /// `s3://`, `hf://`, any case), else as a local path.
    pub fn parse(text: &str) -> Location {
        if SCHEMES.iter().any(|s| has_scheme(text, s)) {
            Location::Url(text.to_string())
        } else {
            Location::Local(PathBuf::from(text))
        }
    }

    /// The path, for a local location.
    pub fn as_local(&self) -> Option<&Path> {
        match self {
            Location::Local(p) => Some(p),
            Location::Url(_) => None,
        }
    }

    /// Whether this is a URL.
    pub fn is_url(&self) -> bool {
        matches!(self, Location::Url(_))
    }

    /// `name` inside this location: `dir/name`, or `URL/name` with one slash between.
    pub fn join(&self, name: &str) -> Location {
        match self {
            Location::Local(p) => Location::Local(p.join(name)),
            Location::Url(u) => Location::Url(format!("{}/{}", u.trim_end_matches('/'), name)),
        }
    }

    /// The last component (a file name), if there is one.
    pub fn file_name(&self) -> Option<&str> {
        match self {
            Location::Local(p) => p.file_name().and_then(|n| n.to_str()),
            Location::Url(u) => {
                let (_, path) = split_url(u);
                path.trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .filter(|n| !n.is_empty())
            }
        }
    }

    /// Everything before the last component (for a URL, without a trailing slash).
    pub fn parent(&self) -> Location {
        match self {
            Location::Local(p) => {
                Location::Local(p.parent().map(Path::to_path_buf).unwrap_or_default())
            }
            Location::Url(u) => {
                let (root, path) = split_url(u);
                let dir = path
                    .trim_end_matches('/')
                    .rsplit_once('/')
                    .map_or("", |(dir, _)| dir);
                Location::Url(format!("{root}{dir}"))
            }
        }
    }
}

/// `scheme://host` and the rest (the path, from its leading slash, or empty).
fn split_url(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let path_at = url[after_scheme..]
        .find('/')
        .map_or(url.len(), |i| after_scheme + i);
    url.split_at(path_at)
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Url(u) => f.write_str(u),
        }
    }
}

impl From<&str> for Location {
    /// See [`Location::parse`].
    fn from(text: &str) -> Location {
        Location::parse(text)
    }
}

impl From<String> for Location {
    /// See [`Location::parse`].
    fn from(text: String) -> Location {
        Location::parse(&text)
    }
}

impl From<&String> for Location {
    /// See [`Location::parse`].
    fn from(text: &String) -> Location {
        Location::parse(text)
    }
}

impl From<&Path> for Location {
    /// Always local: a path is a path.
    fn from(path: &Path) -> Location {
        Location::Local(path.to_path_buf())
    }
}

impl From<PathBuf> for Location {
    /// Always local: a path is a path.
    fn from(path: PathBuf) -> Location {
        Location::Local(path)
    }
}

impl From<&PathBuf> for Location {
    /// Always local: a path is a path.
    fn from(path: &PathBuf) -> Location {
        Location::Local(path.clone())
    }
}

impl From<&Location> for Location {
    fn from(location: &Location) -> Location {
        location.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        for url in [
            "http://127.0.0.1:8080/m",
            "HTTPS://hub.example/m.safetensors",
            "s3://bucket/p/",
        ] {
            assert!(Location::parse(url).is_url(), "{url}");
        }
        for path in ["/data/s3://x", "model.safetensors", "é", "org/name"] {
            assert!(!Location::parse(path).is_url(), "{path}");
        }
        let u = Location::parse("s3://b/m/");
        assert_eq!(
            u.join("a.safetensors").to_string(),
            "s3://b/m/a.safetensors"
        );
        let f = Location::parse("http://h/m/x.safetensors");
        assert_eq!(f.file_name(), Some("x.safetensors"));
        assert_eq!(f.parent().to_string(), "http://h/m");
        assert_eq!(Location::parse("http://h").file_name(), None);
        assert_eq!(Location::parse("http://h/").file_name(), None);
        assert_eq!(
            Location::parse("s3://bucket/a.json").parent().to_string(),
            "s3://bucket"
        );
        assert_eq!(Location::parse("s3://bucket/p/").file_name(), Some("p"));
        let p = Location::from(Path::new("/a/b.json"));
        assert_eq!(p.file_name(), Some("b.json"));
        assert_eq!(p.parent(), Location::Local("/a".into()));
        assert_eq!(p.join("c").to_string(), "/a/b.json/c");
    }
}
