//! The `weightlift` binary, run as a user would, on checkpoints written by the test.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::{Command, Output};
use weightlift_testkit::files::{
    Spec, all_dtypes, disk_tempdir, moe, split, write_file, write_sharded,
};

fn weightlift(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weightlift"))
        .args(args)
        .output()
        .expect("run weightlift")
}

fn ok_json(args: &[&str]) -> Value {
    let out = weightlift(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "exactly one JSON object: {text}"
    );
    serde_json::from_str(&text).unwrap()
}

fn sharded(dir: &Path) -> Vec<Vec<Spec>> {
    let shards = split(moe(2, 3, 16, 8), 2);
    write_sharded(dir, &shards, true);
    shards
}

#[test]
fn inspect_json_matches_what_was_written() {
    let dir = disk_tempdir();
    let shards = sharded(dir.path());
    let v = ok_json(&["inspect", dir.path().to_str().unwrap(), "--json"]);
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    for f in files {
        let path = f["path"].as_str().unwrap();
        let len = std::fs::metadata(path).unwrap().len();
        assert_eq!(
            f["header_bytes"].as_u64().unwrap() + f["data_bytes"].as_u64().unwrap(),
            len
        );
    }
    assert_eq!(v["metadata"], serde_json::json!({"format": "pt"}));
    let tensors = v["tensors"].as_array().unwrap();
    let all: Vec<&Spec> = shards.iter().flatten().collect();
    assert_eq!(tensors.len(), all.len());
    let mut total = 0;
    let mut params = 0;
    for (shard_no, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", shard_no + 1);
        for spec in shard {
            let t = tensors
                .iter()
                .find(|t| t["name"] == spec.name.as_str())
                .unwrap();
            assert_eq!(t["dtype"], spec.dtype.name());
            assert_eq!(t["shape"], serde_json::json!(spec.shape));
            assert_eq!(t["file"], file.as_str());
            let offs = t["data_offsets"].as_array().unwrap();
            assert_eq!(
                offs[1].as_u64().unwrap() - offs[0].as_u64().unwrap(),
                spec.data.len() as u64
            );
            total += spec.data.len() as u64;
            params += spec.shape.iter().product::<usize>() as u64;
        }
    }
    assert_eq!(v["total_bytes"].as_u64().unwrap(), total);
    assert_eq!(v["parameters"].as_u64().unwrap(), params);
    // File order: offsets increase within each file.
    for w in tensors.windows(2) {
        if w[0]["file"] == w[1]["file"] {
            assert!(w[0]["data_offsets"][1].as_u64() <= w[1]["data_offsets"][0].as_u64());
        }
    }
}

#[test]
fn inspect_text_and_filter() {
    let dir = disk_tempdir();
    sharded(dir.path());
    let index = dir.path().join("model.safetensors.index.json");
    let out = weightlift(&[
        "inspect",
        index.to_str().unwrap(),
        "--filter",
        "*.experts.1.*",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("2 files, 6 tensors"), "{text}");
    assert!(text.contains("model.layers.0.mlp.experts.1.up_proj.weight"));
    assert!(!text.contains("experts.0."));
    assert!(text.contains("format = pt"));
    let v = ok_json(&[
        "inspect",
        index.to_str().unwrap(),
        "--filter",
        "*.experts.1.*",
        "--json",
    ]);
    assert_eq!(v["tensors"].as_array().unwrap().len(), 6);
}

#[test]
fn hash_equals_sha256_of_the_written_bytes_on_every_backend() {
    let dir = disk_tempdir();
    let path = dir.path().join("m.safetensors");
    let specs = all_dtypes();
    write_file(&path, &specs);
    for backend in ["auto", "pread", "direct", "mmap"] {
        let v = ok_json(&[
            "hash",
            path.to_str().unwrap(),
            "--backend",
            backend,
            "--json",
        ]);
        let tensors = v["tensors"].as_object().unwrap();
        assert_eq!(tensors.len(), specs.len());
        for s in &specs {
            let t = &tensors[&s.name];
            let hex: String = Sha256::digest(&s.data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(t["sha256"], hex.as_str(), "{backend}: {}", s.name);
            assert_eq!(t["dtype"], s.dtype.name());
            assert_eq!(t["shape"], serde_json::json!(s.shape));
        }
    }
    let text = String::from_utf8(weightlift(&["hash", path.to_str().unwrap()]).stdout).unwrap();
    assert_eq!(text.lines().count(), specs.len());
}

#[test]
fn load_reports_what_it_loaded() {
    let dir = disk_tempdir();
    let shards = sharded(dir.path());
    let count = shards.iter().flatten().count();
    let bytes: usize = shards.iter().flatten().map(|s| s.data.len()).sum();
    let v = ok_json(&[
        "load",
        dir.path().to_str().unwrap(),
        "--json",
        "--threads",
        "3",
        "--backend",
        "direct",
    ]);
    assert_eq!(v["tensors"].as_u64().unwrap(), count as u64);
    assert_eq!(v["bytes"].as_u64().unwrap(), bytes as u64);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
    assert_eq!(v["files"][0]["backend"], "direct");
    let v = ok_json(&[
        "load",
        dir.path().to_str().unwrap(),
        "--json",
        "--device",
        "meta",
    ]);
    assert_eq!(v["tensors"].as_u64().unwrap(), count as u64);
    let out = weightlift(&["load", dir.path().to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("loaded {count} tensors")), "{text}");
    // Mapped where the files are local; owned (and dropped from the cache) when asked.
    let v = ok_json(&[
        "load",
        dir.path().to_str().unwrap(),
        "--json",
        "--map",
        "auto",
    ]);
    assert_eq!(v["files"][0]["placement"], "mapped", "{v}");
    assert_eq!(v["bytes_read"].as_u64().unwrap(), bytes as u64);
    let v = ok_json(&[
        "load",
        dir.path().to_str().unwrap(),
        "--json",
        "--drop-cache",
    ]);
    assert_eq!(v["files"][1]["placement"], "owned", "{v}");
}

#[test]
fn bad_input_is_one_line_and_exit_code_1() {
    let dir = disk_tempdir();
    let path = dir.path().join("broken.safetensors");
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":{\"dtype\":").unwrap();
    for cmd in ["inspect", "hash", "load"] {
        let out = weightlift(&[cmd, path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("broken.safetensors") && err.contains("header"),
            "{err}"
        );
        assert!(!err.contains("panicked"));
    }
    let out = weightlift(&["load", dir.path().join("missing").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let good = dir.path().join("good.safetensors");
    write_file(
        &good,
        &[Spec::new("w", weightlift_format::Dtype::F32, &[4])],
    );
    let text = String::from_utf8(weightlift(&["inspect", good.to_str().unwrap()]).stdout).unwrap();
    assert!(text.contains(": 1 file, 1 tensor, 4 parameters"), "{text}");
    // Without a CUDA driver, `cuda:0` is a one-line error; with one (a GPU machine), it loads.
    let out = weightlift(&["load", good.to_str().unwrap(), "--device", "cuda:0"]);
    if weightlift::CudaEngine::new(0, 1).is_ok() {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("to cuda:0"));
    } else {
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cuda:0") && err.lines().count() == 1, "{err}");
    }
    // Usage errors: exit code 2.
    assert_eq!(weightlift(&["load"]).status.code(), Some(2));
    assert_eq!(
        weightlift(&["load", "x", "--device", "tpu"]).status.code(),
        Some(2)
    );
    assert_eq!(weightlift(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn demo_runs_on_a_small_checkpoint_and_reuses_it() {
    let dir = disk_tempdir();
    let args = [
        "demo",
        "--size",
        "48MiB",
        "--runs",
        "1",
        "--dir",
        dir.path().to_str().unwrap(),
    ];
    let out = weightlift(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("moe profile") && text.contains("x raw read"),
        "{text}"
    );
    for row in [
        "raw read (bound)",
        "fresh memory fill",
        "mapped",
        "owned memory",
    ] {
        assert!(text.contains(row), "{row}: {text}");
    }
    // `--runs 1` runs three times all the same: a median of fewer says little.
    assert!(text.contains("3 runs each"), "{text}");
    assert!(text.contains("warm") && text.contains("cold"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("generating"));
    let again = weightlift(&args);
    assert!(again.status.success());
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("generating"),
        "cached"
    );
}

/// `hash` of a URL equals `hash` of the local files; `inspect` and `load` take URLs too.
#[test]
fn urls_hash_like_local_files() {
    use weightlift_testkit::servers::{Nginx, S3_KEY, S3_REGION, S3_SECRET, S3Server};
    let dir = disk_tempdir();
    let root = dir.path();
    std::fs::create_dir(root.join("sharded")).unwrap();
    sharded(&root.join("sharded"));
    write_file(&root.join("single.safetensors"), &all_dtypes());
    let local = |p: &str| ok_json(&["hash", root.join(p).to_str().unwrap(), "--json"]);

    let nginx = Nginx::start(root);
    for p in ["sharded", "single.safetensors"] {
        let url = nginx.url(p);
        assert_eq!(ok_json(&["hash", &url, "--json"]), local(p), "{url}");
    }
    let v = ok_json(&["inspect", &nginx.url("sharded"), "--json"]);
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
    let v = ok_json(&["load", &nginx.url("sharded"), "--json", "--in-flight", "3"]);
    assert!(v["requests"].as_u64().unwrap() >= 3, "{v}");
    assert_eq!(v["retries"].as_u64(), Some(0));
    assert_eq!(v["files"][0]["backend"], "http");
    let out = weightlift(&["load", &nginx.url("sharded")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("HTTP requests (0 retries)"), "{text}");

    // S3, configured the usual way: environment variables.
    let s3 = S3Server::start();
    s3.create_bucket("ckpts");
    s3.put_dir("ckpts", "moe", &root.join("sharded"));
    let out = Command::new(env!("CARGO_BIN_EXE_weightlift"))
        .args(["hash", "s3://ckpts/moe/", "--json"])
        .env("AWS_ENDPOINT_URL", s3.endpoint())
        .env("AWS_ACCESS_KEY_ID", S3_KEY)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        .env("AWS_REGION", S3_REGION)
        .env("HOME", root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, local("sharded"));

    // A URL that is not there: one line naming it, exit code 1.
    let missing = nginx.url("nope.safetensors");
    let out = weightlift(&["inspect", &missing]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&missing) && err.contains("404") && err.lines().count() == 1,
        "{err}"
    );
}

/// Model ids resolve in a Hugging Face cache laid out as huggingface_hub lays it out (blobs,
/// snapshot symlinks, refs), and `hf://` URLs stream from a hub mirror (`HF_ENDPOINT`) whose
/// repository demands the token and redirects file downloads to a CDN on another host,
/// which must not see the token.
#[test]
fn model_ids_from_the_cache_and_hf_urls_from_a_hub() {
    use weightlift_testkit::servers::Nginx;
    let dir = disk_tempdir();
    let root = dir.path();
    let local = root.join("local");
    std::fs::create_dir(&local).unwrap();
    sharded(&local);
    let expected = ok_json(&["hash", local.to_str().unwrap(), "--json"]);

    // The cache: blobs named by content, snapshot files as relative symlinks to them.
    let repo = root.join("cache/hub/models--org--tiny");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(&local).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let blob = format!("{:x}", Sha256::digest(&bytes));
        std::fs::write(repo.join("blobs").join(&blob), &bytes).unwrap();
        std::os::unix::fs::symlink(
            format!("../../blobs/{blob}"),
            snapshot.join(path.file_name().unwrap()),
        )
        .unwrap();
    }
    let cached = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_weightlift"))
            .args(args)
            .current_dir(root)
            .env("HF_HOME", root.join("cache"))
            .env_remove("HF_HUB_CACHE")
            .output()
            .unwrap()
    };
    for id in ["org/tiny", &format!("org/tiny@{commit}")] {
        let out = cached(&["hash", id, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&out.stdout).unwrap(),
            expected,
            "{id}"
        );
    }
    let out = cached(&["inspect", "org/absent"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("org/absent") && err.contains("Hugging Face cache"),
        "{err}"
    );

    // The hub: the index served by the hub itself, weights through a redirect to a CDN.
    let cdn_root = root.join("cdn/files");
    std::fs::create_dir_all(&cdn_root).unwrap();
    let hub_repo = root.join("hub/org/gated/resolve/main");
    std::fs::create_dir_all(&hub_repo).unwrap();
    for entry in std::fs::read_dir(&local).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        let to = if path.extension().is_some_and(|e| e == "json") {
            hub_repo.join(name)
        } else {
            cdn_root.join(name)
        };
        std::fs::copy(&path, to).unwrap();
    }
    // The CDN refuses requests that carry a token: it must never receive one.
    let cdn = Nginx::start_with(
        &root.join("cdn"),
        "location /files/ { if ($http_authorization) { return 403; } }",
    );
    let cdn_port = cdn.addr().port();
    let hub = Nginx::start_with(
        &root.join("hub"),
        &format!(
            "location /org/gated/ {{ if ($http_authorization != \"Bearer hf_test_token\") {{ return 401; }} \
             rewrite ^/org/gated/resolve/main/(.+\\.safetensors)$ http://localhost:{cdn_port}/files/$1 redirect; }}"
        ),
    );
    let from_hub = |token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weightlift"));
        cmd.args(["hash", "hf://org/gated", "--json"])
            .env("HF_ENDPOINT", hub.url(""))
            .env("HF_HOME", root.join("no-home"))
            .env_remove("HF_TOKEN");
        if let Some(token) = token {
            cmd.env("HF_TOKEN", token);
        }
        cmd.output().unwrap()
    };
    let out = from_hub(Some("hf_test_token"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        expected
    );
    let out = from_hub(None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    // The token file under HF_HOME works like HF_TOKEN.
    std::fs::create_dir_all(root.join("home")).unwrap();
    std::fs::write(root.join("home/token"), "hf_test_token\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weightlift"))
        .args(["hash", "hf://org/gated@main", "--json"])
        .env("HF_ENDPOINT", hub.url(""))
        .env("HF_HOME", root.join("home"))
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(cdn);
}

#[test]
fn generate_writes_a_checkpoint_that_loads_and_refuses_to_overwrite() {
    let dir = disk_tempdir();
    let out = dir.path().join("moe");
    let gen_args = ["generate", out.to_str().unwrap(), "--size", "4MiB"];
    let first = weightlift(&gen_args);
    assert!(first.status.success(), "{first:?}");
    let said = String::from_utf8_lossy(&first.stdout);
    assert!(said.contains("tensors in 2 shards"), "{said}");
    let ckpt = weightlift::Checkpoint::open(&out).unwrap();
    assert!(ckpt.len() > 50 && ckpt.shards().len() == 2);
    let state = ckpt.load(&weightlift::LoadOptions::default()).unwrap();
    assert_eq!(state.byte_len(), ckpt.data_bytes());

    let again = weightlift(&gen_args);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds safetensors files"));
}

#[test]
fn hash_filters_converts_and_refuses_meta() {
    let dir = disk_tempdir();
    let shards = sharded(dir.path());
    let path = dir.path().to_str().unwrap();
    let all = ok_json(&["hash", path, "--json"]);
    let all = all["tensors"].as_object().unwrap();
    let picked = ok_json(&["hash", path, "--filter", "*layers.1.*", "--json"]);
    let picked = picked["tensors"].as_object().unwrap();
    assert!(!picked.is_empty() && picked.len() < all.len());
    for (name, t) in picked {
        assert!(name.contains("layers.1."), "{name}");
        assert_eq!(t, &all[name], "a filtered hash is the same hash");
    }
    // Converted: F32 bytes of each floating-point tensor, as a CPU conversion gives them.
    let converted = ok_json(&["hash", path, "--convert", "f32", "--json"]);
    let ckpt = weightlift::Checkpoint::open(dir.path()).unwrap();
    let state = ckpt
        .load(&weightlift::LoadOptions::default().convert_to(weightlift::Dtype::F32))
        .unwrap();
    for t in &state {
        let hex = format!("{:x}", Sha256::digest(t.bytes().unwrap()));
        assert_eq!(converted["tensors"][t.name()]["sha256"], hex.as_str());
        assert_eq!(converted["tensors"][t.name()]["dtype"], t.dtype().name());
    }
    assert!(!shards.is_empty());
    let meta = weightlift(&["hash", path, "--device", "meta"]);
    assert_eq!(meta.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&meta.stderr).contains("meta tensors have no bytes"));
}
