//! A pod's home directory: the part of the pod's container disk the emulator provides. SSH
//! sessions on the pod start there with `HOME` pointing at it (see [`super::sshd`]). It holds
//! `bin/nvidia-smi` (a POSIX sh stand-in answering for the pod's GPUs), `.profile` (puts
//! `~/bin` first for login shells, as Debian's skeleton does) and `.gpu_utilization` (the
//! utilization `nvidia-smi` and the API report). Created with the pod; emptied and provisioned
//! again when the container is recreated (stop, preemption, restart: RunPod's container disk is
//! volatile); removed on terminate and at emulator shutdown.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The utilization file, relative to the home: an integer percent, the same for every GPU of
/// the pod; missing or empty means 0.
pub(super) const UTILIZATION_FILE: &str = ".gpu_utilization";

/// Fields `nvidia-smi --query-gpu` answers (aliases `gpu_name`, `gpu_uuid` accepted).
const QUERY_FIELDS: &str = "index, name, uuid, count, memory.total, utilization.gpu";

/// The GPUs a pod was sold, as its `nvidia-smi` reports them.
#[derive(Debug, Clone)]
pub(super) struct Gpus {
    /// The name `nvidia-smi` prints; for RunPod ids the id itself (`NVIDIA RTX A5000`).
    pub(super) name: String,
    /// How many.
    pub(super) count: u32,
    /// Memory of one GPU in MiB.
    pub(super) memory_mib: u64,
    /// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxx`; GPU `i` appends `i` as 4 hex digits.
    pub(super) uuid_prefix: String,
}

impl Gpus {
    /// The GPUs of pod `pod_id`: `count` × `name` with `memory_gb` GB each; UUIDs derived from
    /// the pod id (stable for the pod, distinct between pods).
    pub(super) fn new(pod_id: &str, name: &str, count: u32, memory_gb: u32) -> Gpus {
        let a = fnv1a(pod_id.as_bytes(), 0xcbf2_9ce4_8422_2325);
        let b = fnv1a(pod_id.as_bytes(), 0x6c62_272e_07bb_0142);
        let hex = format!("{a:016x}{b:016x}");
        Gpus {
            name: name.to_owned(),
            count,
            memory_mib: u64::from(memory_gb) * 1024,
            uuid_prefix: format!(
                "GPU-{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..28]
            ),
        }
    }

    /// UUID of GPU `index`, as `nvidia-smi -L` prints it.
    pub(super) fn uuid(&self, index: u32) -> String {
        format!("{}{:04x}", self.uuid_prefix, index & 0xffff)
    }
}

/// 64-bit FNV-1a: a fixed, dependency-free hash for the GPU UUIDs (not security relevant).
fn fnv1a(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Creates `home` (mode 0700) with `bin/nvidia-smi` and `.profile` for `pod_id`'s `gpus`.
pub(super) fn provision(home: &Path, pod_id: &str, gpus: &Gpus) -> io::Result<()> {
    std::fs::create_dir_all(home)?;
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))?;
    let bin = home.join("bin");
    std::fs::create_dir_all(&bin)?;
    let smi = bin.join("nvidia-smi");
    std::fs::write(&smi, nvidia_smi_script(home, pod_id, gpus))?;
    std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(
        home.join(".profile"),
        "# Written by the runpod-autoscaler emulator: login shells get ~/bin first too\n\
         # (/etc/profile resets PATH), as Debian's skeleton .profile does.\n\
         if [ -d \"$HOME/bin\" ]; then PATH=\"$HOME/bin:$PATH\"; fi\n",
    )?;
    Ok(())
}

/// Empties `home` and provisions it again: the container was recreated.
pub(super) fn reset(home: &Path, pod_id: &str, gpus: &Gpus) -> io::Result<()> {
    remove(home)?;
    provision(home, pod_id, gpus)
}

/// Removes `home` and everything in it (gone already is fine).
pub(super) fn remove(home: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(home) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The utilization `nvidia-smi` reports now: the file's integer percent (surrounding
/// whitespace allowed), 0 when the file is missing or empty; `None` when it holds anything
/// else (then `nvidia-smi` fails, naming the file).
pub(super) fn read_utilization(home: &Path) -> Option<u8> {
    match std::fs::read_to_string(home.join(UTILIZATION_FILE)) {
        Ok(text) => parse_utilization(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some(0),
        Err(_) => None,
    }
}

fn parse_utilization(text: &str) -> Option<u8> {
    let t = text.trim();
    if t.is_empty() {
        return Some(0);
    }
    if !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = t.trim_start_matches('0');
    match digits.len() {
        0 => Some(0),
        1..=3 => digits.parse::<u8>().ok().filter(|v| *v <= 100),
        _ => None,
    }
}

/// Writes `percent` (0–100) to the utilization file atomically (a temporary file renamed over
/// it), so a concurrent `nvidia-smi` never reads a half-written value.
pub(super) fn write_utilization(home: &Path, percent: u8) -> io::Result<()> {
    let tmp: PathBuf = home.join(format!("{UTILIZATION_FILE}.tmp"));
    std::fs::write(&tmp, format!("{percent}\n"))?;
    std::fs::rename(&tmp, home.join(UTILIZATION_FILE))
}

/// Quotes `s` for a POSIX shell (single quotes; `'` as `'\''`).
pub(super) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `nvidia-smi` stand-in for `gpus`, reading utilization from `home`'s file. Bad flags,
/// unknown fields and formats exit 2 ("a supplied argument or flag is invalid", as the real
/// tool's return codes say) with a message on stderr; an unreadable utilization file exits 255.
fn nvidia_smi_script(home: &Path, pod_id: &str, gpus: &Gpus) -> String {
    let util_file = home.join(UTILIZATION_FILE);
    let util_file = util_file.to_string_lossy();
    format!(
        r#"#!/bin/sh
# nvidia-smi stand-in written by the runpod-autoscaler emulator for pod {pod_id:?}:
# {count} x {name:?}, {memory} MiB each. GPU utilization is the integer percent in
# {util_file:?} (missing or empty: 0), the same for every GPU; any process on
# the pod may write it, as may the emulator's PUT /admin/pods/ID/utilization.
name={q_name}
count={count}
memory={memory}
uuid_prefix={q_uuid}
util_file={q_util}

bad_arg() {{
  printf '%s\n' "nvidia-smi (emulated): $1" "Run 'nvidia-smi -h' for the options this emulated nvidia-smi answers." >&2
  exit 2
}}

usage() {{
  cat <<'EOF'
nvidia-smi stand-in of the runpod-autoscaler emulator (a pod's GPUs, no hardware):
  nvidia-smi                       summary of the pod's GPUs
  nvidia-smi -L | --list-gpus      one line per GPU: GPU i: NAME (UUID: GPU-...)
  nvidia-smi --query-gpu=FIELDS --format=csv[,noheader][,nounits]
      FIELDS: comma-separated, from {fields}
  nvidia-smi -h | --help           this text
EOF
}}

utilization() {{
  [ -e "$util_file" ] || {{ echo 0; return 0; }}
  raw=$(cat "$util_file") || {{ echo "nvidia-smi (emulated): cannot read $util_file" >&2; exit 255; }}
  v=$(printf '%s' "$raw" | tr -d ' \t\r\n')
  case $v in
    '') echo 0; return 0 ;;
    *[!0-9]*) v=bad ;;
    *) v=${{v#"${{v%%[!0]*}}"}}; [ -n "$v" ] || v=0
       if [ ${{#v}} -gt 3 ] || [ "$v" -gt 100 ]; then v=bad; fi ;;
  esac
  if [ "$v" = bad ]; then
    printf '%s\n' "nvidia-smi (emulated): $util_file holds \"$raw\", not an integer percent from 0 to 100; write one, e.g. echo 50 > $util_file" >&2
    exit 255
  fi
  echo "$v"
}}

uuid_of() {{
  printf '%s%04x' "$uuid_prefix" "$1"
}}

list=; query=; format=; query_set=; format_set=
while [ $# -gt 0 ]; do
  case $1 in
    -L|--list-gpus) list=1 ;;
    -h|--help) usage; exit 0 ;;
    --query-gpu=*) query=${{1#--query-gpu=}}; query_set=1 ;;
    --query-gpu) [ $# -ge 2 ] || bad_arg '"--query-gpu" needs a list of fields.'; shift; query=$1; query_set=1 ;;
    --format=*) format=${{1#--format=}}; format_set=1 ;;
    --format) [ $# -ge 2 ] || bad_arg '"--format" needs a value such as csv,noheader,nounits.'; shift; format=$1; format_set=1 ;;
    *) bad_arg "option \"$1\" is unknown or not emulated." ;;
  esac
  shift
done

set -f
if [ -n "$list" ]; then
  [ -z "$query_set$format_set" ] || bad_arg '"-L" cannot be combined with "--query-gpu" or "--format".'
  i=0
  while [ "$i" -lt "$count" ]; do
    printf 'GPU %d: %s (UUID: %s)\n' "$i" "$name" "$(uuid_of "$i")"
    i=$((i + 1))
  done
  exit 0
fi

if [ -z "$query_set" ]; then
  [ -z "$format_set" ] || bad_arg '"--format" is only valid with "--query-gpu".'
  util=$(utilization) || exit $?
  printf '%s\n' "nvidia-smi (runpod-autoscaler emulator): $count GPU(s)" "GPU  Name                              Memory-Total  GPU-Util"
  i=0
  while [ "$i" -lt "$count" ]; do
    printf '%-4d %-33s %8d MiB  %7d %%\n' "$i" "$name" "$memory" "$util"
    i=$((i + 1))
  done
  exit 0
fi

[ -n "$format_set" ] || bad_arg '"--query-gpu" requires "--format", e.g. --format=csv,noheader,nounits.'
csv=; noheader=; nounits=
old_ifs=$IFS; IFS=,
for opt in $format; do
  opt=$(printf '%s' "$opt" | tr -d ' ')
  case $opt in
    csv) csv=1 ;;
    noheader) noheader=1 ;;
    nounits) nounits=1 ;;
    *) IFS=$old_ifs; bad_arg "format option \"$opt\" is not valid; use csv with optional noheader and nounits." ;;
  esac
done
[ -n "$csv" ] || {{ IFS=$old_ifs; bad_arg "\"--format=$format\" must include csv (the only output format)."; }}
fields=
for f in $query; do
  f=$(printf '%s' "$f" | tr -d ' ')
  case $f in
    index|name|uuid|count|memory.total|utilization.gpu) ;;
    gpu_name) f=name ;;
    gpu_uuid) f=uuid ;;
    '') IFS=$old_ifs; bad_arg "\"--query-gpu=$query\" has an empty field." ;;
    *) IFS=$old_ifs; bad_arg "field \"$f\" is not a valid field to query here; valid: {fields}." ;;
  esac
  fields="$fields $f"
done
IFS=$old_ifs
[ -n "$fields" ] || bad_arg '"--query-gpu" needs at least one field.'

case $fields in *utilization.gpu*) util=$(utilization) || exit $? ;; esac
if [ -z "$noheader" ]; then
  line=
  for f in $fields; do
    case $f in
      memory.total) h='memory.total [MiB]' ;;
      utilization.gpu) h='utilization.gpu [%]' ;;
      *) h=$f ;;
    esac
    line=${{line:+$line, }}$h
  done
  printf '%s\n' "$line"
fi
i=0
while [ "$i" -lt "$count" ]; do
  line=
  for f in $fields; do
    case $f in
      index) v=$i ;;
      name) v=$name ;;
      uuid) v=$(uuid_of "$i") ;;
      count) v=$count ;;
      memory.total) v=$memory; [ -n "$nounits" ] || v="$v MiB" ;;
      utilization.gpu) v=$util; [ -n "$nounits" ] || v="$v %" ;;
    esac
    line=${{line:+$line, }}$v
  done
  printf '%s\n' "$line"
  i=$((i + 1))
done
"#,
        count = gpus.count,
        name = gpus.name,
        memory = gpus.memory_mib,
        q_name = sh_quote(&gpus.name),
        q_uuid = sh_quote(&gpus.uuid_prefix),
        q_util = sh_quote(&util_file),
        fields = QUERY_FIELDS,
    )
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn utilization_text_parses_like_the_script() {
        for (text, want) in [
            ("", Some(0)),
            (" \n", Some(0)),
            ("0", Some(0)),
            ("42\n", Some(42)),
            (" 007 ", Some(7)),
            ("100", Some(100)),
            ("0000100", Some(100)),
            ("101", None),
            ("1000", None),
            ("-1", None),
            ("4 2", None),
            ("50%", None),
            ("abc", None),
            ("99999999999999999999999", None),
        ] {
            assert_eq!(parse_utilization(text), want, "{text:?}");
        }
    }

    #[test]
    fn gpu_uuids_are_stable_per_pod_and_distinct_between_pods() {
        let a = Gpus::new("abc", "NVIDIA RTX A5000", 2, 24);
        assert_eq!(a.memory_mib, 24 * 1024);
        assert_eq!(a.uuid(0), Gpus::new("abc", "x", 1, 1).uuid(0));
        assert_ne!(a.uuid(0), a.uuid(1));
        assert_ne!(a.uuid(0), Gpus::new("abd", "x", 1, 1).uuid(0));
        let u = a.uuid(1);
        let parts: Vec<&str> = u.trim_start_matches("GPU-").split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{u}"
        );
        assert!(u.ends_with("0001"), "{u}");
    }

    #[test]
    fn sh_quote_survives_quotes_and_newlines() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
        assert_eq!(sh_quote("x\ny"), "'x\ny'");
    }

    /// Runs the home's `nvidia-smi` with `args`: (exit code, stdout, stderr).
    fn smi(home: &Path, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(home.join("bin/nvidia-smi"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn nvidia_smi_answers_queries_lists_and_refuses_bad_flags() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("pod");
        let gpus = Gpus::new("p1", "NVIDIA RTX A5000", 2, 24);
        provision(&home, "p1", &gpus).unwrap();
        let q = "--query-gpu=name,memory.total,utilization.gpu";
        let (code, out, err) = smi(&home, &[q, "--format=csv,noheader,nounits"]);
        assert_eq!((code, err.as_str()), (0, ""));
        assert_eq!(
            out,
            "NVIDIA RTX A5000, 24576, 0\nNVIDIA RTX A5000, 24576, 0\n"
        );

        write_utilization(&home, 37).unwrap();
        let (_, out, _) = smi(&home, &[q, "--format=csv"]);
        assert_eq!(
            out,
            "name, memory.total [MiB], utilization.gpu [%]\n\
             NVIDIA RTX A5000, 24576 MiB, 37 %\nNVIDIA RTX A5000, 24576 MiB, 37 %\n"
        );
        let (_, out, _) = smi(
            &home,
            &[
                "--query-gpu",
                "index, gpu_uuid,count",
                "--format",
                "csv,noheader",
            ],
        );
        assert_eq!(
            out,
            format!("0, {}, 2\n1, {}, 2\n", gpus.uuid(0), gpus.uuid(1))
        );
        let (code, out, _) = smi(&home, &["-L"]);
        assert_eq!(code, 0);
        assert_eq!(
            out,
            format!(
                "GPU 0: NVIDIA RTX A5000 (UUID: {})\nGPU 1: NVIDIA RTX A5000 (UUID: {})\n",
                gpus.uuid(0),
                gpus.uuid(1)
            )
        );
        let (code, out, _) = smi(&home, &[]);
        assert_eq!(code, 0);
        assert!(
            out.contains("NVIDIA RTX A5000") && out.contains("37 %"),
            "{out}"
        );
        assert_eq!(smi(&home, &["--help"]).0, 0);

        for (args, says) in [
            (vec!["-q"], "\"-q\" is unknown"),
            (vec!["--query-gpu=name"], "requires \"--format\""),
            (
                vec!["--query-gpu=name,bogus", "--format=csv"],
                "field \"bogus\"",
            ),
            (
                vec!["--query-gpu=name,,count", "--format=csv"],
                "empty field",
            ),
            (
                vec!["--query-gpu=name", "--format=json"],
                "\"json\" is not valid",
            ),
            (
                vec!["--query-gpu=name", "--format=noheader"],
                "must include csv",
            ),
            (vec!["--format=csv"], "only valid with"),
            (
                vec!["-L", "--query-gpu=name", "--format=csv"],
                "cannot be combined",
            ),
            (vec!["--query-gpu"], "needs a list"),
        ] {
            let (code, out, err) = smi(&home, &args);
            assert_eq!(code, 2, "{args:?}: {out} {err}");
            assert!(out.is_empty(), "{args:?}: {out}");
            assert!(err.contains(says), "{args:?}: {err}");
            assert!(err.contains("nvidia-smi -h"), "{args:?}: {err}");
        }

        std::fs::write(home.join(UTILIZATION_FILE), "busy\n").unwrap();
        let (code, out, err) = smi(&home, &[q, "--format=csv,noheader,nounits"]);
        assert_eq!(code, 255, "{out}");
        assert!(err.contains("not an integer percent") && err.contains(UTILIZATION_FILE));
        assert_eq!(read_utilization(&home), None);
        // Queries without utilization do not read the file.
        assert_eq!(smi(&home, &["--query-gpu=name", "--format=csv"]).0, 0);
        std::fs::write(home.join(UTILIZATION_FILE), " 090 \n").unwrap();
        let (_, out, _) = smi(
            &home,
            &["--query-gpu=utilization.gpu", "--format=csv,noheader"],
        );
        assert_eq!(out, "90 %\n90 %\n");

        reset(&home, "p1", &gpus).unwrap();
        assert!(
            !home.join(UTILIZATION_FILE).exists(),
            "a new container starts at 0"
        );
        assert_eq!(read_utilization(&home), Some(0));
        remove(&home).unwrap();
        assert!(!home.exists());
        remove(&home).unwrap();
    }
}
