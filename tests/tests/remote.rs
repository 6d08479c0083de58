//! Remote storage end to end, against real servers on 127.0.0.1: nginx for HTTP, moto for
//! S3, and a fault-injecting proxy in front of either. Loads over the network must return
//! exactly the local files' bytes, or a clear error naming the URL and the tensor.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use weightlift::remote::{RemoteOptions, S3Config};
use weightlift::{Checkpoint, Error, LoadOptions, OpenOptions};
use weightlift_testkit::files::{
    Spec, all_dtypes, dense, disk_tempdir, moe, split, write_file, write_sharded,
};
use weightlift_testkit::servers::{
    Fault, FaultProxy, Nginx, S3_KEY, S3_REGION, S3_SECRET, S3Server,
};

type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn load_all(ckpt: &Checkpoint, options: &LoadOptions) -> Tensors {
    ckpt.load(options)
        .unwrap()
        .into_tensors()
        .into_iter()
        .map(|t| {
            (
                t.name().to_string(),
                (
                    t.dtype().to_string(),
                    t.shape().to_vec(),
                    t.bytes().unwrap().to_vec(),
                ),
            )
        })
        .collect()
}

fn local(path: &Path) -> Tensors {
    let ckpt = Checkpoint::open(path).unwrap();
    load_all(&ckpt, &LoadOptions::default())
}

/// Fast retries, so fault tests take milliseconds.
fn quick_retries() -> RemoteOptions {
    RemoteOptions::default()
        .backoff(Duration::from_millis(1))
        .max_backoff(Duration::from_millis(5))
        .read_timeout(Duration::from_secs(10))
}

fn open(url: &str, remote: RemoteOptions) -> Result<Checkpoint, Error> {
    Checkpoint::open_with(url, &OpenOptions::default().remote(remote))
}

/// A directory with: `single.safetensors` (every dtype), `sharded/` (3 shards + index),
/// `moe/` (2 shards, no index), `one/model.safetensors` (no index), `none/` (nothing).
fn checkpoints() -> tempfile::TempDir {
    let dir = disk_tempdir();
    let root = dir.path();
    write_file(&root.join("single.safetensors"), &all_dtypes());
    for sub in ["sharded", "moe", "one", "none"] {
        std::fs::create_dir(root.join(sub)).unwrap();
    }
    write_sharded(&root.join("sharded"), &split(dense(3, 96), 3), true);
    write_sharded(&root.join("moe"), &split(moe(2, 16, 32, 24), 2), false);
    write_file(
        &root.join("one/model.safetensors"),
        &[Spec::new("w", weightlift::Dtype::F16, &[10, 10])],
    );
    std::fs::write(root.join("none/README"), "no weights here").unwrap();
    dir
}

/// The processes whose parent is `pid` (from /proc/*/stat: the field after the command).
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `PID (COMMAND) STATE PPID ...`: the command may hold spaces and parentheses.
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        if after.split_whitespace().nth(1) == Some(&pid.to_string()) {
            found.push(child);
        }
    }
    found
}

#[test]
fn a_stopped_nginx_leaves_no_worker_running() {
    let dir = checkpoints();
    let server = Nginx::start(dir.path());
    let master = server.pid();
    let mut workers = children_of(master);
    for _ in 0..200 {
        if !workers.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        workers = children_of(master);
    }
    assert!(
        !workers.is_empty(),
        "nginx's master {master} has no workers"
    );
    drop(server);
    // Killed alone, the master would leave its workers running, orphaned.
    let left: Vec<u32> = workers
        .into_iter()
        .filter(|w| Path::new(&format!("/proc/{w}")).exists())
        .collect();
    assert!(left.is_empty(), "nginx workers still running: {left:?}");
}

#[test]
fn http_loads_equal_local_loads() {
    let dir = checkpoints();
    let root = dir.path();
    let nginx = Nginx::start(root);
    let cases = [
        ("single.safetensors", "single.safetensors"),
        ("sharded", "sharded"),
        ("sharded/", "sharded"),
        ("sharded/model.safetensors.index.json", "sharded"),
        ("one", "one"),
    ];
    for (url_path, local_path) in cases {
        let url = nginx.url(url_path);
        let ckpt = open(&url, RemoteOptions::default()).unwrap();
        assert!(ckpt.shards().iter().all(|s| s.backend().name() == "http"));
        // Small requests: many coalesced reads, pieces split across requests.
        let options = LoadOptions::default().request_size(64 << 10);
        assert_eq!(
            load_all(&ckpt, &options),
            local(&root.join(local_path)),
            "{url}"
        );
        let stats = ckpt.remote_stats().unwrap();
        assert!(stats.requests >= ckpt.shards().len() as u64, "{stats:?}");
        assert_eq!(stats.retries, 0);
    }

    // Lazy reads and slices go over the network too.
    let ckpt = open(&nginx.url("sharded"), RemoteOptions::default()).unwrap();
    let whole = ckpt.get("model.layers.1.mlp.up_proj.weight").unwrap();
    let rows = ckpt
        .get_slice("model.layers.1.mlp.up_proj.weight", &[5..9])
        .unwrap();
    let row_len = whole.bytes().unwrap().len() / whole.shape()[0];
    assert_eq!(
        rows.bytes().unwrap(),
        &whole.bytes().unwrap()[5 * row_len..9 * row_len]
    );

    // A filter reads only what it selects.
    let before = ckpt.remote_stats().unwrap().bytes;
    let state = ckpt
        .load(&LoadOptions::default().prefix("model.layers.0."))
        .unwrap();
    let selected: u64 = state.iter().map(|t| t.bytes().unwrap().len() as u64).sum();
    assert_eq!(ckpt.remote_stats().unwrap().bytes - before, selected);
}

#[test]
fn http_errors_name_the_url() {
    let dir = checkpoints();
    let root = dir.path();
    let nginx = Nginx::start(root);

    let err = open(&nginx.url("none"), RemoteOptions::default()).unwrap_err();
    assert!(matches!(err, Error::NoShards { .. }), "{err}");
    assert!(err.to_string().contains(&nginx.url("none")), "{err}");

    let err = open(&nginx.url("missing.safetensors"), RemoteOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&nginx.url("missing.safetensors")) && msg.contains("404"),
        "{msg}"
    );

    // The index lists a shard the server does not have.
    std::fs::rename(
        root.join("sharded/model-00002-of-00003.safetensors"),
        root.join("sharded/moved.safetensors"),
    )
    .unwrap();
    let err = open(&nginx.url("sharded"), RemoteOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("model-00002-of-00003.safetensors") && msg.contains("404"),
        "{msg}"
    );

    // A fixed local backend makes no sense for a URL.
    let err = Checkpoint::open_with(
        nginx.url("single.safetensors"),
        &OpenOptions::default().backend(weightlift::Backend::pread()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)), "{err}");
}

#[test]
fn https_with_a_private_ca() {
    let dir = checkpoints();
    let root = dir.path();
    let nginx = Nginx::start_tls(root);
    let url = nginx.url("sharded");
    assert!(url.starts_with("https://"));
    // The built-in (Mozilla) roots do not know the test CA.
    let err = open(&url, quick_retries()).unwrap_err();
    assert!(err.to_string().contains(&url), "{err}");
    let trusting = RemoteOptions::default().ca_certs(Some(nginx.ca_pem()));
    let ckpt = open(&url, trusting).unwrap();
    assert_eq!(
        load_all(&ckpt, &LoadOptions::default().request_size(64 << 10)),
        local(&root.join("sharded"))
    );
    let missing = RemoteOptions::default().ca_certs(Some(root.join("no-such.pem")));
    let err = open(&url, missing).unwrap_err();
    assert!(err.to_string().contains("no-such.pem"), "{err}");
}

#[test]
fn http_bearer_token_opens_protected_paths() {
    let dir = checkpoints();
    let root = dir.path();
    let nginx = Nginx::start_with(
        root,
        r#"location /sharded/ { if ($http_authorization != "Bearer s3cret") { return 401; } }"#,
    );
    let url = nginx.url("sharded");
    let err = open(&url, RemoteOptions::default()).unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let with_token = RemoteOptions::default().bearer_token(Some("s3cret".into()));
    assert!(
        !format!("{with_token:?}").contains("s3cret"),
        "the token stays out of logs"
    );
    let ckpt = open(&url, with_token).unwrap();
    assert_eq!(
        load_all(&ckpt, &LoadOptions::default()),
        local(&root.join("sharded"))
    );
}

#[test]
fn http_object_changed_or_truncated_mid_load_is_an_error() {
    let dir = checkpoints();
    let root = dir.path();
    let nginx = Nginx::start(root);
    let file = root.join("single.safetensors");
    let url = nginx.url("single.safetensors");

    // Same length, other bytes, later mtime: nginx's ETag changes.
    let ckpt = open(&url, quick_retries()).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let err = ckpt.load(&LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Read { .. }), "{msg}");
    assert!(
        msg.contains(&url) && msg.contains("changed") && msg.contains("tensor"),
        "{msg}"
    );

    // Truncated after open: an error, never a short tensor.
    let ckpt = open(&url, quick_retries()).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(n as u64 / 2)
        .unwrap();
    let err = ckpt.load(&LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Read { .. }) && msg.contains(&url),
        "{msg}"
    );
}

#[test]
fn http_faults_are_retried_to_identical_bytes() {
    let dir = checkpoints();
    let root = dir.path();
    let nginx = Nginx::start(root);
    let proxy = FaultProxy::start(nginx.addr(), |n| match n % 10 {
        1 => Fault::Status(503),
        3 => Fault::Truncate,
        5 => Fault::Drop,
        7 => Fault::Status(429),
        _ => Fault::Pass,
    });
    for path in ["sharded", "one", "single.safetensors"] {
        let ckpt = open(&proxy.url(path), quick_retries()).unwrap();
        let options = LoadOptions::default().request_size(32 << 10);
        assert_eq!(load_all(&ckpt, &options), local(&root.join(path)), "{path}");
        assert!(ckpt.remote_stats().unwrap().retries > 0);
    }
    assert!(
        proxy.faults() >= proxy.requests() / 3,
        "{} of {}",
        proxy.faults(),
        proxy.requests()
    );

    // Every body cut short: each retry asks only for the missing part, so it completes.
    let halves = FaultProxy::start(nginx.addr(), |n| {
        if n < 4 { Fault::Pass } else { Fault::Truncate }
    });
    let ckpt = open(&halves.url("single.safetensors"), quick_retries()).unwrap();
    let got = load_all(&ckpt, &LoadOptions::default().threads(1));
    assert_eq!(got, local(&root.join("single.safetensors")));
}

#[test]
fn http_retries_run_out_with_a_clear_error() {
    let dir = checkpoints();
    let root = dir.path();
    let nginx = Nginx::start(root);
    // Headers open fine (one request per shard plus the index), then every request fails.
    let proxy = FaultProxy::start(nginx.addr(), |n| {
        if n < 4 {
            Fault::Pass
        } else {
            Fault::Status(503)
        }
    });
    let remote = quick_retries().max_retries(3);
    let ckpt = open(&proxy.url("sharded"), remote).unwrap();
    let err = ckpt.load(&LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, Error::Read { .. }), "{msg}");
    assert!(
        msg.contains(&proxy.url("sharded/model-"))
            && msg.contains("503")
            && msg.contains("giving up after 4"),
        "{msg}"
    );
}

#[test]
fn s3_loads_equal_local_loads() {
    let dir = checkpoints();
    let root = dir.path();
    let s3 = S3Server::start();
    s3.create_bucket("models");
    s3.put(
        "models",
        "single.safetensors",
        &std::fs::read(root.join("single.safetensors")).unwrap(),
    );
    s3.put_dir("models", "dense/sharded", &root.join("sharded"));
    s3.put_dir("models", "moe", &root.join("moe"));
    let config = |endpoint: &str| {
        S3Config::new(
            Some(endpoint),
            S3_REGION,
            Some((S3_KEY.into(), S3_SECRET.into(), None)),
        )
        .unwrap()
    };
    let remote = quick_retries().s3(Some(config(&s3.endpoint())));

    for (url, local_path) in [
        ("s3://models/single.safetensors", "single.safetensors"),
        ("s3://models/dense/sharded", "sharded"),
        (
            "s3://models/dense/sharded/model.safetensors.index.json",
            "sharded",
        ),
        // No index: the prefix is listed.
        ("s3://models/moe/", "moe"),
    ] {
        let ckpt = open(url, remote.clone()).unwrap();
        assert!(ckpt.shards().iter().all(|s| s.backend().name() == "s3"));
        let options = LoadOptions::default().request_size(64 << 10);
        assert_eq!(
            load_all(&ckpt, &options),
            local(&root.join(local_path)),
            "{url}"
        );
    }

    // Through the fault proxy (signatures cover the proxy's host, which it forwards).
    let proxy = FaultProxy::start(s3.addr(), |n| match n % 6 {
        2 => Fault::Status(503),
        4 => Fault::Truncate,
        5 => Fault::Drop,
        _ => Fault::Pass,
    });
    let faulty = quick_retries().s3(Some(config(&proxy.endpoint())));
    let ckpt = open("s3://models/moe", faulty).unwrap();
    let options = LoadOptions::default().request_size(16 << 10);
    assert_eq!(load_all(&ckpt, &options), local(&root.join("moe")));
    assert!(ckpt.remote_stats().unwrap().retries > 0);

    // Errors: no such key, no such prefix, object replaced mid-load.
    let err = open("s3://models/nothing.safetensors", remote.clone()).unwrap_err();
    assert!(
        err.to_string().contains("s3://models/nothing.safetensors"),
        "{err}"
    );
    let err = open("s3://models/empty-prefix/", remote.clone()).unwrap_err();
    assert!(matches!(err, Error::NoShards { .. }), "{err}");
    let ckpt = open("s3://models/single.safetensors", remote.clone()).unwrap();
    let mut bytes = std::fs::read(root.join("single.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    s3.put("models", "single.safetensors", &bytes);
    let err = ckpt.load(&LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("s3://models/single.safetensors") && msg.contains("changed"),
        "{msg}"
    );
}
