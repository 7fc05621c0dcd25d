//! Checkpoint throughput: a 1 GiB directory uploaded (`checkpoint`) and downloaded (`restore`,
//! every part verified) through our store, side by side with `aws s3 cp` (the AWS CLI from the
//! project venv, another S3 stack) against the same s3s-fs in the same run, at 8 MiB and 64 MiB
//! parts and the same parallelism. Prints MB/s (10^6 bytes per second, best of `REPS`) and the
//! ratio ours / AWS CLI.
//!
//! Run: `scripts/test.sh` once (installs s3s-fs and the venv), then `cargo bench --bench
//! checkpoint`. `RPA_S3S_BIN` and `RPA_AWS_CLI` override the tools' paths; `RPA_BENCH_MIB` the
//! size (default 1024).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runpod_autoscaler::checkpoint::{CheckpointOptions, CheckpointStore, S3Store, TransferOptions};
use runpod_autoscaler::config::CheckpointConfig;
use runpod_autoscaler::model::Secret;

const MIB: u64 = 1024 * 1024;
/// Parts in flight for both clients: the AWS CLI's default is 10; 8 is the store's default.
const PARALLELISM: usize = 8;
/// Best of this many runs per cell: enough to shed noisy runs on a shared 2-core machine.
const REPS: usize = 3;
const ACCESS: &str = "bench-access";
const SECRET: &str = "bench-secret-0123456789";
const BUCKET: &str = "bench";

fn tool(var: &str, default: &Path) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| default.to_owned());
    assert!(
        p.is_file(),
        "{} not found: run scripts/test.sh (installs s3s-fs and the AWS CLI) or set {var}",
        p.display()
    );
    p
}

struct Server {
    child: std::process::Child,
    port: u16,
    data: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(bin: &Path, dir: &Path) -> Server {
    let data = dir.join("data");
    std::fs::create_dir_all(data.join(BUCKET)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS, "--secret-key", SECRET])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting s3s-fs");
    let until = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "s3s-fs did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, port, data }
}

/// Deterministic incompressible bytes (xorshift64*), written in 8 MiB blocks.
fn write_file(path: &Path, bytes: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 8 * MIB as usize];
    let mut left = bytes;
    while left > 0 {
        for w in block.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            w.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn aws(cli: &Path, env: &[(&str, String)], args: &[&str]) {
    let out = Command::new(cli)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .stdout(Stdio::null())
        .output()
        .expect("running the AWS CLI");
    assert!(
        out.status.success(),
        "aws {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let s3s = tool("RPA_S3S_BIN", &root.join(".tools/s3s/bin/s3s-fs"));
    let cli = tool("RPA_AWS_CLI", &root.join(".venv/bin/aws"));
    let size_mib: u64 = std::env::var("RPA_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let total = size_mib * MIB;
    let work = tempfile::tempdir().unwrap();
    let server = start_server(&s3s, work.path());
    let endpoint = format!("http://127.0.0.1:{}", server.port);
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let file = src.join("checkpoint.bin");
    write_file(&file, total);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "checkpoint bench: {size_mib} MiB, {PARALLELISM} parts in flight, s3s-fs on loopback, best of {REPS}"
    );
    println!(
        "{:>9} | {:>12} {:>12} {:>6} | {:>14} {:>14} {:>6}",
        "part", "ours up MB/s", "aws up MB/s", "ratio", "ours down MB/s", "aws down MB/s", "ratio"
    );
    for part_mib in [8u64, 64] {
        let mut cfg = CheckpointConfig::for_bucket(BUCKET);
        cfg.endpoint = Some(endpoint.clone());
        cfg.region = Some("us-east-1".into());
        cfg.access_key_id = Some(ACCESS.into());
        cfg.secret_access_key = Some(Secret::new(SECRET));
        cfg.part_size = part_mib * MIB;
        cfg.parallelism = PARALLELISM;
        cfg.keep = 1;
        cfg.prefix = format!("ours-{part_mib}");
        let store = rt.block_on(S3Store::connect(&cfg)).expect("store");
        let opts = CheckpointOptions {
            writer: "bench".into(),
            ..CheckpointOptions::default()
        };
        let home = work.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let config = home.join("aws-config");
        std::fs::write(
            &config,
            format!(
                "[default]\ns3 =\n  addressing_style = path\n  multipart_threshold = {part_mib}MB\n  \
                 multipart_chunksize = {part_mib}MB\n  max_concurrent_requests = {PARALLELISM}\n"
            ),
        )
        .unwrap();
        let env = [
            ("HOME", home.display().to_string()),
            ("AWS_CONFIG_FILE", config.display().to_string()),
            ("AWS_ACCESS_KEY_ID", ACCESS.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.to_owned()),
            ("AWS_DEFAULT_REGION", "us-east-1".to_owned()),
            ("AWS_ENDPOINT_URL", endpoint.clone()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ];
        let key = format!("s3://{BUCKET}/cli-{part_mib}/checkpoint.bin");
        let file_arg = file.display().to_string();
        let out = work.path().join("out");
        let out_arg = out.join("checkpoint.bin").display().to_string();
        // Interleaved (ours, then the CLI's, each rep) so that load from elsewhere on the
        // machine falls on both alike; the best of each is kept.
        let mut times = [Duration::MAX; 4];
        for _ in 0..REPS {
            let timed = |f: &mut dyn FnMut()| {
                let t = Instant::now();
                f();
                t.elapsed()
            };
            let runs = [
                timed(&mut || {
                    rt.block_on(store.checkpoint("bench", &src, &opts))
                        .expect("checkpoint");
                }),
                timed(&mut || {
                    let m = rt
                        .block_on(store.latest("bench"))
                        .unwrap()
                        .expect("a checkpoint");
                    rt.block_on(store.restore(&m, &out, &TransferOptions::default()))
                        .expect("restore");
                }),
                timed(&mut || {
                    aws(
                        &cli,
                        &env,
                        &["s3", "cp", "--only-show-errors", &file_arg, &key],
                    )
                }),
                timed(&mut || {
                    aws(
                        &cli,
                        &env,
                        &["s3", "cp", "--only-show-errors", &key, &out_arg],
                    )
                }),
            ];
            let _ = std::fs::remove_dir_all(&out);
            for (best, t) in times.iter_mut().zip(runs) {
                *best = (*best).min(t);
            }
        }
        let [ours_up, ours_down, aws_up, aws_down] = times;
        for dir in [cfg.prefix.clone(), format!("cli-{part_mib}")] {
            let _ = std::fs::remove_dir_all(server.data.join(BUCKET).join(dir));
        }
        let (ou, au, od, ad) = (
            mbps(total, ours_up),
            mbps(total, aws_up),
            mbps(total, ours_down),
            mbps(total, aws_down),
        );
        println!(
            "{:>6} MiB | {ou:>12.0} {au:>12.0} {:>5.2}x | {od:>14.0} {ad:>14.0} {:>5.2}x",
            part_mib,
            ou / au,
            od / ad
        );
    }
}
