//! The checkpoint commands of the binary against s3s-fs: `agent checkpoint` / `agent resume`
//! (exit 3 when there is nothing to resume), `checkpoint ls | show | gc`, the store from flags
//! plus the AWS environment or from a configuration file's `[checkpoint]` table.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::s3::{S3s, BUCKET};

fn binary(s3: &S3s, home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_runpod-autoscaler"));
    // Only what we give: no profile files, no credentials from the machine.
    c.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(s3.aws_env());
    c
}

fn run(mut c: Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().expect("running the binary");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_commands_checkpoint_and_resume_with_documented_exit_codes() {
    let s3 = S3s::start().await;
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("ckpt")).unwrap();
    std::fs::write(
        src.path().join("ckpt/model.pt"),
        vec![42u8; 3 * 1024 * 1024],
    )
    .unwrap();
    std::fs::write(src.path().join("step"), b"1200\n").unwrap();
    let store = ["--bucket", BUCKET, "--prefix", "cli"];

    // Nothing yet: exit 3.
    let out = tempfile::tempdir().unwrap();
    let mut c = binary(&s3, home.path());
    c.args(["agent", "resume", "--job", "job-1", "--dir"])
        .arg(out.path())
        .args(store);
    let (code, _, err) = run(c);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("nothing to resume"), "{err}");

    // Checkpoint: writer from RPA_POD_ID, metadata, one JSON line.
    let mut c = binary(&s3, home.path());
    c.env("RPA_POD_ID", "pod-7")
        .args([
            "agent",
            "checkpoint",
            "--job",
            "job-1",
            "--meta",
            "step=1200",
            "--dir",
        ])
        .arg(src.path())
        .args(store);
    let (code, stdout, err) = run(c);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "not a terminal, yet stderr has: {err}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["event"], "checkpoint");
    assert_eq!(
        (line["seq"].as_u64(), line["writer"].as_str()),
        (Some(1), Some("pod-7"))
    );
    assert_eq!(line["files"], 2);

    // Resume: exit 0, the same files.
    let mut c = binary(&s3, home.path());
    c.args(["agent", "resume", "--job", "job-1", "--dir"])
        .arg(out.path())
        .args(store);
    let (code, stdout, err) = run(c);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("\"resumed\""), "{stdout}");
    assert_eq!(
        std::fs::read(out.path().join("ckpt/model.pt")).unwrap(),
        vec![42u8; 3 * 1024 * 1024]
    );
    assert_eq!(std::fs::read(out.path().join("step")).unwrap(), b"1200\n");

    // On a terminal (a pseudo-terminal from util-linux `script`): a progress bar.
    let cmd = format!(
        "{} agent checkpoint --job job-tty --writer w --bucket {BUCKET} --prefix cli --dir {}",
        env!("CARGO_BIN_EXE_runpod-autoscaler"),
        src.path().display()
    );
    let mut c = Command::new("script");
    c.env_clear()
        .env("HOME", home.path())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TERM", "xterm")
        .envs(s3.aws_env())
        .args(["-qec", &cmd, "/dev/null"]);
    let (code, tty, _) = run(c);
    assert_eq!(code, 0, "{tty}");
    assert!(
        tty.contains("upload") && tty.contains("MiB"),
        "no progress bar: {tty}"
    );

    // Bad input: exit 2, naming the problem.
    let mut c = binary(&s3, home.path());
    c.args(["agent", "resume", "--job", "../../etc", "--dir"])
        .arg(out.path())
        .args(store);
    let (code, _, err) = run(c);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid job id"), "{err}");
    let mut c = binary(&s3, home.path());
    c.args(["agent", "resume", "--job", "job-1", "--dir"])
        .arg(out.path());
    let (code, _, err) = run(c);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--bucket"), "{err}");

    // No credentials anywhere: a clear error, not a hang on a metadata service.
    let mut c = binary(&s3, home.path());
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .args(["checkpoint", "ls"])
        .args(store);
    let (code, _, err) = run(c);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no credentials") && err.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );

    // A damaged part: `show --verify` and `agent resume` exit 4.
    let data = std::fs::read_dir(s3.object_file("cli/job-1/00000000000000000001"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".data"))
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    let mut c = binary(&s3, home.path());
    c.args(["checkpoint", "show", "job-1", "--verify"])
        .args(store);
    let (code, _, err) = run(c);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("corrupt"), "{err}");
    let again = tempfile::tempdir().unwrap();
    let mut c = binary(&s3, home.path());
    c.args(["agent", "resume", "--job", "job-1", "--dir"])
        .arg(again.path())
        .args(store);
    let (code, _, err) = run(c);
    assert_eq!(code, 4, "{err}");
    assert!(std::fs::read_dir(again.path()).unwrap().next().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_list_show_and_collect_from_a_config_file() {
    let s3 = S3s::start().await;
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    // Only the [checkpoint] table matters; the rest of a service configuration may be absent.
    let config = home.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[checkpoint]\nbucket = \"{BUCKET}\"\nprefix = \"ops\"\nendpoint = \"{}\"\n\
             part_size = \"5MiB\"\nkeep = 5\n",
            s3.endpoint()
        ),
    )
    .unwrap();
    let with_config = |args: &[&str]| {
        let mut c = binary(&s3, home.path());
        c.args(args).arg("--config").arg(&config);
        c
    };
    for step in 1..=3 {
        std::fs::write(src.path().join("state"), format!("step {step}")).unwrap();
        let mut c = with_config(&["agent", "checkpoint", "--job", "job-o", "--writer", "w1"]);
        c.arg("--dir").arg(src.path());
        let (code, _, err) = run(c);
        assert_eq!(code, 0, "{err}");
    }

    let (code, stdout, err) = run(with_config(&["checkpoint", "ls"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        stdout.lines().filter(|l| l.contains("complete")).count(),
        3,
        "{stdout}"
    );
    let (code, stdout, _) = run(with_config(&[
        "checkpoint",
        "ls",
        "--job",
        "job-o",
        "--output",
        "json",
    ]));
    assert_eq!(code, 0);
    let gens: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(gens.as_array().unwrap().len(), 3);

    let (code, stdout, err) = run(with_config(&["checkpoint", "show", "job-o"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("seq       3") && stdout.contains("writer    w1"),
        "{stdout}"
    );
    let (code, stdout, _) = run(with_config(&[
        "checkpoint",
        "show",
        "job-o",
        "--seq",
        "2",
        "--output",
        "json",
    ]));
    assert_eq!(code, 0);
    let m: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(m["seq"], 2);
    let (code, _, _) = run(with_config(&["checkpoint", "show", "job-o", "--seq", "9"]));
    assert_eq!(code, 3);

    let (code, stdout, err) = run(with_config(&[
        "checkpoint",
        "gc",
        "--keep",
        "1",
        "--dry-run",
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("would remove 2 generations"), "{stdout}");
    let (code, stdout, err) = run(with_config(&["checkpoint", "gc", "--keep", "1"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("removed job-o generation 1 (retention"),
        "{stdout}"
    );
    let (_, stdout, _) = run(with_config(&["checkpoint", "ls", "--output", "json"]));
    let gens: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(gens[0]["seq"], 3);
    assert_eq!(gens.as_array().unwrap().len(), 1);

    // Invalid configuration: exit 2 naming the key.
    std::fs::write(&config, "[checkpoint]\nbucket = \"x\"\n").unwrap();
    let (code, _, err) = run(with_config(&["checkpoint", "ls"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("checkpoint.bucket"), "{err}");
}
