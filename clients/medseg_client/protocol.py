"""What a client and a medseg server (or its gateway) agree on beyond Triton's own protocol: ports and headers."""

# Triton's usual ports, the defaults of `medseg serve`, the compose files and the client's --url
GRPC_PORT, HTTP_PORT, METRICS_PORT = 8001, 8000, 8002
DEFAULT_URL = f"localhost:{GRPC_PORT}"

# Triton's admin APIs, closed behind a key unless the caller sends it: gRPC header
# "triton-grpc-protocol-medseg-admin-key", HTTP header "medseg-admin-key". Health, metadata and inference stay open.
ADMIN_PROTOCOLS = ("model-repository", "shared-memory", "logging", "trace", "statistics")
ADMIN_KEY_NAME = "medseg-admin-key"
ADMIN_GRPC_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_NAME}"

# per-request times the server measured (the postprocess its own), in the findings JSON; the client moves them into
# the result's timings, so findings stay the same for the same study
SERVER_TIMINGS_KEY = "server_timings_s"

# the tenant's key a medseg gateway routes by (``medseg mig compose``); plain gRPC metadata
TENANT_KEY_HEADER = "medseg-tenant-key"


def shared_memory_kind(value: bool | str | None) -> str | None:
    """The client's transport for the study and the labels: None (in the gRPC messages), "system" (True), or
    "cuda:<device>" ("cuda" is device 0); anything else is refused by name (ValueError)."""
    if value is None or value is False or value == "":
        return None
    if value is True or value == "system":
        return "system"
    kind, sep, device = str(value).partition(":")
    if kind == "cuda" and (not sep or device.isdigit()):
        return f"cuda:{int(device or 0)}"
    raise ValueError(f"shared memory must be system, cuda or cuda:<device>, got {value!r}")
