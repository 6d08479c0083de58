//! Real servers on 127.0.0.1 for the remote-storage tests and benchmarks: nginx serving a
//! directory (HTTP ranges), moto as an S3-compatible store, and a small HTTP proxy that
//! injects faults on a schedule.
//!
//! Servers are child processes killed when their handle drops. A missing server binary is a
//! panic naming how to install it (`.ci/run` installs both), never a silently skipped test.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Waits until `port` accepts connections or `child` exits.
fn wait_ready(child: &mut Child, port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}"));
        }
        if Instant::now() > deadline {
            return Err(format!("not listening on port {port} after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn find_program(env_var: &str, name: &str, fixed: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Some(PathBuf::from(p));
    }
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .collect()
        })
        .unwrap_or_default();
    fixed
        .iter()
        .map(PathBuf::from)
        .chain(on_path)
        .find(|p| p.is_file())
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops nginx: SIGTERM to its master process, which stops its workers and then exits; a
/// SIGKILL would end the master alone and leave the workers running, orphaned, holding the
/// test's directory (after a few runs of the tests, dozens of them). SIGKILL only where the
/// master has not exited within a few seconds.
fn terminate(child: &mut Child) {
    use rustix::process::{Pid, Signal, kill_process};
    if kill_process(Pid::from_child(child), Signal::TERM).is_ok() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    kill(child);
}

/// nginx serving a directory over HTTP (or HTTPS) on 127.0.0.1, with Range support.
pub struct Nginx {
    child: Child,
    port: u16,
    tls: bool,
    conf: tempfile::TempDir,
}

/// Writes a CA and a server certificate for 127.0.0.1 signed by it into `dir` (`ca.pem`,
/// `server.pem`, `server.key`), with the `openssl` command.
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("openssl not runnable: {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("writing server.ext");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=weightlift test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}

impl Nginx {
    /// The nginx binary: `$NGINX`, `/usr/sbin/nginx` or on `PATH`.
    pub fn binary() -> Option<PathBuf> {
        find_program("NGINX", "nginx", &["/usr/sbin/nginx"])
    }

    /// Starts nginx serving `root` (see [`Nginx::binary`]).
    pub fn start(root: &Path) -> Nginx {
        Nginx::start_with(root, "")
    }

    /// Starts nginx serving `root`, with `extra` added to its `server` block (e.g. a
    /// `location` that demands a token).
    pub fn start_with(root: &Path, extra: &str) -> Nginx {
        Nginx::launch(root, extra, false)
    }

    /// Starts nginx serving `root` over HTTPS with a certificate for 127.0.0.1 signed by a
    /// CA made for the occasion ([`Nginx::ca_pem`]).
    pub fn start_tls(root: &Path) -> Nginx {
        Nginx::launch(root, "", true)
    }

    /// The CA certificate (PEM) that signed an HTTPS server's certificate.
    pub fn ca_pem(&self) -> PathBuf {
        self.conf.path().join("ca.pem")
    }

    fn launch(root: &Path, extra: &str, tls: bool) -> Nginx {
        let nginx = Nginx::binary().unwrap_or_else(|| {
            panic!("nginx not found: `apt-get install -y nginx-light` (bash .ci/run does)")
        });
        let root = root.canonicalize().expect("server root");
        let mut last_error = String::new();
        // A free port can be taken between the check and nginx's bind: try a few.
        for _ in 0..5 {
            let conf = tempfile::tempdir().expect("temp dir");
            let port = free_port();
            let d = conf.path().display();
            let listen = if tls {
                make_certificates(conf.path());
                format!(
                    "listen 127.0.0.1:{port} ssl; ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key;"
                )
            } else {
                format!("listen 127.0.0.1:{port};")
            };
            // As root, workers would switch to `nobody`, who cannot read test temp dirs.
            let user = if rustix::process::geteuid().is_root() {
                "user root;"
            } else {
                ""
            };
            let text = format!(
                "{user}\ndaemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  sendfile on;\n  keepalive_requests 100000;\n\
                 client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 server {{ {listen} root {root}; location / {{ }} {extra} }}\n}}\n",
                root = root.display()
            );
            let conf_path = conf.path().join("nginx.conf");
            std::fs::write(&conf_path, text).expect("writing nginx.conf");
            let mut child = Command::new(&nginx)
                .arg("-c")
                .arg(&conf_path)
                .arg("-p")
                .arg(conf.path())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", nginx.display()));
            match wait_ready(&mut child, port, Duration::from_secs(10)) {
                Ok(()) => {
                    return Nginx {
                        child,
                        port,
                        tls,
                        conf,
                    };
                }
                Err(e) => {
                    terminate(&mut child);
                    let log =
                        std::fs::read_to_string(conf.path().join("error.log")).unwrap_or_default();
                    last_error = format!("{e}: {log}");
                }
            }
        }
        panic!("nginx did not start: {last_error}");
    }

    /// `http://127.0.0.1:PORT/path` (`https://` for a TLS server).
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}://127.0.0.1:{}/{}",
            if self.tls { "https" } else { "http" },
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The process id of nginx's master process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// An S3-compatible server on 127.0.0.1 (`moto_server`, from the `moto[server]` Python
/// package). Any key and secret are accepted; requests must still be validly signed.
pub struct S3Server {
    child: Child,
    port: u16,
    agent: ureq::Agent,
}

/// Region and credentials the tests sign with.
pub const S3_REGION: &str = "us-east-1";
/// Access key for [`S3Server`].
pub const S3_KEY: &str = "weightlift-test";
/// Secret key for [`S3Server`].
pub const S3_SECRET: &str = "weightlift-secret";

impl S3Server {
    /// Starts `moto_server` (from `$MOTO_SERVER` or `PATH`); takes a few seconds.
    pub fn start() -> S3Server {
        let moto = find_program("MOTO_SERVER", "moto_server", &[]).unwrap_or_else(|| {
            panic!("moto_server not found: `pip install 'moto[server]'` (bash .ci/run does)")
        });
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(&moto)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", moto.display()));
            match wait_ready(&mut child, port, Duration::from_secs(60)) {
                Ok(()) => {
                    let agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .build()
                        .new_agent();
                    return S3Server { child, port, agent };
                }
                Err(e) => {
                    kill(&mut child);
                    last_error = e;
                }
            }
        }
        panic!("moto_server did not start: {last_error}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn bucket(&self, name: &str) -> rusty_s3::Bucket {
        rusty_s3::Bucket::new(
            self.endpoint().parse().expect("endpoint URL"),
            rusty_s3::UrlStyle::Path,
            name.to_string(),
            S3_REGION,
        )
        .expect("bucket")
    }

    fn credentials() -> rusty_s3::Credentials {
        rusty_s3::Credentials::new(S3_KEY, S3_SECRET)
    }

    /// Creates bucket `name`.
    pub fn create_bucket(&self, name: &str) {
        use rusty_s3::S3Action;
        let bucket = self.bucket(name);
        let creds = S3Server::credentials();
        let url =
            rusty_s3::actions::CreateBucket::new(&bucket, &creds).sign(Duration::from_secs(600));
        let response = self
            .agent
            .put(url.as_str())
            .send_empty()
            .expect("create bucket");
        assert!(
            response.status().is_success(),
            "create bucket {name}: {}",
            response.status()
        );
    }

    /// Stores `bytes` at `key` in `bucket`.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        use rusty_s3::S3Action;
        let b = self.bucket(bucket);
        let creds = S3Server::credentials();
        let url =
            rusty_s3::actions::PutObject::new(&b, Some(&creds), key).sign(Duration::from_secs(600));
        let response = self
            .agent
            .put(url.as_str())
            .send(bytes)
            .expect("put object");
        assert!(
            response.status().is_success(),
            "put {key}: {}",
            response.status()
        );
    }

    /// Uploads every file of `dir` (not recursive) under `prefix/`.
    pub fn put_dir(&self, bucket: &str, prefix: &str, dir: &Path) {
        for entry in std::fs::read_dir(dir).expect("reading dir") {
            let path = entry.expect("dir entry").path();
            if path.is_file() {
                let name = path.file_name().unwrap().to_string_lossy();
                let key = format!("{}/{name}", prefix.trim_end_matches('/'));
                self.put(bucket, &key, &std::fs::read(&path).expect("reading file"));
            }
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// What the proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward it and return the answer unchanged.
    Pass,
    /// Answer with this status and an empty body, without asking upstream.
    Status(u16),
    /// Close the connection without answering.
    Drop,
    /// Forward it, then send the answer's headers and only half of its body.
    Truncate,
}

/// An HTTP/1.1 proxy on 127.0.0.1 that forwards each request (one per connection) to an
/// upstream server, applying the [`Fault`] its schedule picks for the request's number.
pub struct FaultProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

type Schedule = Arc<dyn Fn(u64) -> Fault + Send + Sync>;

impl FaultProxy {
    /// Starts a proxy to `upstream` applying `schedule(n)` to the n-th request (from 0).
    pub fn start(
        upstream: SocketAddr,
        schedule: impl Fn(u64) -> Fault + Send + Sync + 'static,
    ) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let faults = Arc::new(AtomicU64::new(0));
        let schedule: Schedule = Arc::new(schedule);
        let thread = {
            let (stop, requests, faults) = (stop.clone(), requests.clone(), faults.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (schedule, requests, faults) =
                        (schedule.clone(), requests.clone(), faults.clone());
                    std::thread::spawn(move || {
                        let _ = serve(stream, upstream, &*schedule, &requests, &faults);
                    });
                }
            })
        };
        FaultProxy {
            port,
            stop,
            requests,
            faults,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT/path`.
    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Requests that got a fault so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads up to the end of an HTTP head (`\r\n\r\n`); returns the head and any bytes after it.
fn read_head(stream: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > 64 << 10 {
            return Err(std::io::Error::other("head too long"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    schedule: &(dyn Fn(u64) -> Fault + Send + Sync),
    requests: &AtomicU64,
    faults: &AtomicU64,
) -> std::io::Result<()> {
    let (head, _) = read_head(&mut client)?;
    let n = requests.fetch_add(1, Ordering::SeqCst);
    let fault = schedule(n);
    if fault != Fault::Pass {
        faults.fetch_add(1, Ordering::SeqCst);
    }
    match fault {
        Fault::Drop => return client.shutdown(Shutdown::Both),
        Fault::Status(code) => {
            let answer = format!(
                "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            client.write_all(answer.as_bytes())?;
            return client.shutdown(Shutdown::Both);
        }
        Fault::Pass | Fault::Truncate => {}
    }
    // One request per connection: ask upstream to close, so its answer ends at EOF.
    let text = String::from_utf8_lossy(&head);
    let mut forwarded = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(forwarded.as_bytes())?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    if fault == Fault::Truncate {
        let body_at = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(answer.len(), |p| p + 4);
        let keep = body_at + (answer.len() - body_at) / 2;
        answer.truncate(keep);
    }
    client.write_all(&answer)?;
    client.shutdown(Shutdown::Both)
}
