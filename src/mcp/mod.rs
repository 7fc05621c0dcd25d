//! The Model Context Protocol server (`rmcp`, the official Rust SDK; this module only): pod
//! access as tools for AI agents over stdio. Tools: `list_gpus`, `list_pods`, `exec`,
//! `upload`, `download`, `list_files`, `plan` (read-only), and `terminate_pod` only when
//! `access.allow_terminate` is set. Each tool's input has a JSON schema (derived with
//! `schemars`). A failure is a tool result with `isError: true` and structured content
//! `{"error": {"kind", "message"}}`, `kind` one of [`AccessError::kind`]'s names, so an agent
//! can tell a bad key from an unknown pod, an offline pod or a full disk and act on it.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ErrorData, ServerHandler, ServiceExt};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use crate::access::transfer::TransferSettings;
use crate::access::{AccessError, PodAccess};
use crate::model::PodId;

/// Most bytes of each output stream an `exec` result carries (the rest is cut, and said so).
pub const MAX_OUTPUT: usize = 64 * 1024;

/// The read-only plan, computed by whoever knows the full configuration (the binary).
#[async_trait]
pub trait PlanSource: Send + Sync {
    /// The plan a tick would carry out now, as JSON; nothing is executed.
    async fn plan(&self) -> Result<serde_json::Value, String>;
}

/// A failure result an agent can act on.
fn failure(kind: &str, message: String) -> CallToolResult {
    CallToolResult::structured_error(json!({"error": {"kind": kind, "message": message}}))
}

fn access_failure(e: AccessError) -> CallToolResult {
    failure(e.kind(), e.to_string())
}

fn ok<T: serde::Serialize>(value: &T) -> CallToolResult {
    match serde_json::to_value(value) {
        Ok(v) => CallToolResult::structured(v),
        Err(e) => failure("internal", e.to_string()),
    }
}

/// `exec` input.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ExecArgs {
    /// The pod id (see `list_pods`).
    pub pod: String,
    /// A shell command line, run by the pod's shell in its home directory.
    pub command: String,
}

/// `upload` input.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct UploadArgs {
    /// The pod id.
    pub pod: String,
    /// File or directory on the machine running this server.
    pub local_path: String,
    /// Destination on the pod (relative to its home; into it when it is a directory).
    pub remote_path: String,
}

/// `download` input.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct DownloadArgs {
    /// The pod id.
    pub pod: String,
    /// File or directory on the pod (relative to its home).
    pub remote_path: String,
    /// Destination on the machine running this server (into it when it is a directory).
    pub local_path: String,
}

/// `list_files` input.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListFilesArgs {
    /// The pod id.
    pub pod: String,
    /// Directory on the pod (relative to its home); default: the home.
    #[serde(default)]
    pub path: Option<String>,
}

/// `terminate_pod` input.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct PodArgs {
    /// The pod id.
    pub pod: String,
}

/// The tools, over one [`PodAccess`].
#[derive(Clone)]
pub struct PodTools {
    access: PodAccess,
    transfer: TransferSettings,
    planner: Option<Arc<dyn PlanSource>>,
    tool_router: ToolRouter<PodTools>,
}

fn cut(bytes: &[u8]) -> (String, bool) {
    let n = bytes.len().min(MAX_OUTPUT);
    (
        String::from_utf8_lossy(&bytes[..n]).into_owned(),
        bytes.len() > n,
    )
}

#[tool_router]
impl PodTools {
    /// Tools over `access`; `terminate_pod` is offered only when `allow_terminate`.
    pub fn new(
        access: PodAccess,
        transfer: TransferSettings,
        planner: Option<Arc<dyn PlanSource>>,
        allow_terminate: bool,
    ) -> PodTools {
        let mut tool_router = Self::tool_router();
        if !allow_terminate {
            tool_router.remove_route("terminate_pod");
        }
        PodTools {
            access,
            transfer,
            planner,
            tool_router,
        }
    }

    /// Names of the tools offered.
    pub fn tool_names(&self) -> Vec<String> {
        self.tool_router
            .list_all()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect()
    }

    #[tool(
        description = "GPU types RunPod offers: memory, on-demand and spot prices per GPU-hour, stock."
    )]
    async fn list_gpus(&self) -> Result<CallToolResult, ErrorData> {
        Ok(match self.access.provider().offerings().await {
            Ok(o) => ok(&json!({ "gpus": o })),
            Err(e) => access_failure(AccessError::from_provider(e)),
        })
    }

    #[tool(
        description = "Pods this autoscaler owns: id, name, state, GPU type and count, $/h, SSH endpoint."
    )]
    async fn list_pods(&self) -> Result<CallToolResult, ErrorData> {
        Ok(match self.access.pods().await {
            Ok(p) => ok(&json!({ "pods": p })),
            Err(e) => access_failure(e),
        })
    }

    #[tool(
        description = "Run a shell command on a pod over SSH; returns exit_status, stdout and stderr (each cut at 64 KiB)."
    )]
    async fn exec(&self, Parameters(a): Parameters<ExecArgs>) -> Result<CallToolResult, ErrorData> {
        Ok(match self.access.exec(&a.pod, &a.command).await {
            Ok(out) => {
                let (stdout, cut_out) = cut(&out.stdout);
                let (stderr, cut_err) = cut(&out.stderr);
                ok(&json!({
                    "pod": a.pod,
                    "exit_status": out.exit_status,
                    "stdout": stdout,
                    "stderr": stderr,
                    "truncated": cut_out || cut_err,
                }))
            }
            Err(e) => access_failure(e),
        })
    }

    #[tool(
        description = "Copy a local file or directory to a pod: chunked, every chunk's SHA-256 checked on the pod, resumable, free space checked first."
    )]
    async fn upload(
        &self,
        Parameters(a): Parameters<UploadArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let local = PathBuf::from(&a.local_path);
        Ok(
            match self
                .access
                .upload(&a.pod, &local, &a.remote_path, &self.transfer)
                .await
            {
                Ok(r) => ok(&r),
                Err(e) => access_failure(e),
            },
        )
    }

    #[tool(
        description = "Copy a file or directory from a pod to this machine: chunked, SHA-256 checked, resumable, free space checked first."
    )]
    async fn download(
        &self,
        Parameters(a): Parameters<DownloadArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let local = PathBuf::from(&a.local_path);
        Ok(
            match self
                .access
                .download(&a.pod, &a.remote_path, &local, &self.transfer)
                .await
            {
                Ok(r) => ok(&r),
                Err(e) => access_failure(e),
            },
        )
    }

    #[tool(
        description = "List a directory on a pod: name, kind (file, dir, symlink, other), size, modification time."
    )]
    async fn list_files(
        &self,
        Parameters(a): Parameters<ListFilesArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = a.path.unwrap_or_else(|| ".".into());
        Ok(match self.access.list_files(&a.pod, &path).await {
            Ok(entries) => ok(&json!({ "pod": a.pod, "path": path, "entries": entries })),
            Err(e) => access_failure(e),
        })
    }

    #[tool(
        description = "The scaling plan a tick would carry out now (read-only: nothing is launched or terminated)."
    )]
    async fn plan(&self) -> Result<CallToolResult, ErrorData> {
        Ok(match &self.planner {
            None => failure(
                "disabled",
                "plan needs the service configuration: start the server with `mcp --config FILE`"
                    .into(),
            ),
            Some(p) => match p.plan().await {
                Ok(v) => ok(&v),
                Err(e) => failure("plan", e),
            },
        })
    }

    #[tool(
        description = "Terminate one of our pods for good (its disk is lost). Offered only when access.allow_terminate is set."
    )]
    async fn terminate_pod(
        &self,
        Parameters(a): Parameters<PodArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let pods = match self.access.pods().await {
            Ok(p) => p,
            Err(e) => return Ok(access_failure(e)),
        };
        if !pods.iter().any(|p| p.id.as_str() == a.pod) {
            return Ok(access_failure(AccessError::UnknownPod { pod: a.pod }));
        }
        Ok(
            match self
                .access
                .provider()
                .terminate(&PodId(a.pod.clone()))
                .await
            {
                Ok(()) => ok(&json!({ "pod": a.pod, "terminated": true })),
                Err(e) => access_failure(AccessError::from_provider(e)),
            },
        )
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for PodTools {
    fn get_info(&self) -> ServerConfig {
        let mut info = Implementation::from_build_env();
        info.name = "runpod-autoscaler".into();
        info.version = env!("CARGO_PKG_VERSION").into();
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(info)
            .with_instructions(
                "RunPod pods for GPU work: list GPUs and pods, run commands, move files with \
                 integrity checks, see the scaling plan. Errors carry error.kind: bad_api_key, \
                 unknown_pod, pod_offline, disk_full, path, integrity, ssh, sftp, provider, disabled.",
            )
    }
}

/// Errors of the MCP transport.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The session could not start or ended abnormally.
    #[error("MCP server: {0}")]
    Serve(String),
}

/// Serves `tools` over stdin/stdout until the client closes the connection.
pub async fn serve_stdio(tools: PodTools) -> Result<(), McpError> {
    let running = tools
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| McpError::Serve(e.to_string()))?;
    running
        .waiting()
        .await
        .map_err(|e| McpError::Serve(e.to_string()))?;
    Ok(())
}
