"""The ``medseg`` command: phantom, serve, segment, demo.

A refused input or an unreachable server prints one line and exits 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import MedsegError
from medseg.spec import SPEC

if TYPE_CHECKING:
    from medseg.server import ServerOptions


def cmd_phantom(args: argparse.Namespace) -> int:
    from medseg.phantom import generate
    from medseg.studies import write_phantom

    ph = generate(args.seed, num_slices=args.slices)
    paths = write_phantom(ph, args.out, args.format)
    print(f"phantom seed {args.seed}: {ph.ct.shape[2]}x{ph.ct.shape[1]}x{ph.ct.shape[0]} voxels, spacing "
          f"{ph.spacing[2]:.3f}x{ph.spacing[1]:.3f}x{ph.spacing[0]:.3f} mm, {len(ph.tumors)} tumor(s) -> {args.out}"
          f" ({len(paths)} files)")
    return 0


def serve_options(args: argparse.Namespace) -> ServerOptions:
    """The embedded server's options for ``medseg serve``: hardened unless told otherwise."""
    import secrets

    from medseg.server import ServerOptions, Tls

    extra: list[str] = []
    if args.flavor == "cuda":
        from medseg.flavors import cuda_memory_pool_args, require_cuda

        require_cuda()  # refuse here, with the reason, rather than as a model load failure in the server's log
        extra = cuda_memory_pool_args()
    if (args.tls_cert is None) != (args.tls_key is None):
        raise MedsegError("--tls-cert and --tls-key go together (the server's certificate chain and its key, PEM)")
    tls = None
    if args.tls_cert is not None:
        for path in (args.tls_cert, args.tls_key):
            if not path.is_file():
                raise MedsegError(f"TLS file not found: {path}")
        tls = Tls(args.tls_cert, args.tls_key)
    # the admin protocols are always closed: behind $MEDSEG_ADMIN_KEY, or a key nobody knows
    admin_key = os.environ.get("MEDSEG_ADMIN_KEY") or secrets.token_urlsafe(24)
    return ServerOptions(flavor=args.flavor, grpc_port=args.grpc_port, http_port=args.http_port,
                         metrics_port=args.metrics_port, address=args.address, extra_args=extra, http=args.http,
                         admin_key=admin_key, tls=tls)


def cmd_serve(args: argparse.Namespace) -> int:
    from medseg.server import EmbeddedServer

    options = serve_options(args)
    server = EmbeddedServer(options)
    t0 = time.monotonic()

    def announce() -> None:
        http = f"HTTP {server.http_url}" if options.http else "HTTP off"
        admin = "admin APIs need $MEDSEG_ADMIN_KEY" if os.environ.get("MEDSEG_ADMIN_KEY") else "admin APIs closed"
        print(f"medseg serving {SPEC.ensemble.name} ({args.flavor} flavor): gRPC{'+TLS' if options.tls else ''} "
              f"{server.grpc_url}, {http}, {admin}; ready in {time.monotonic() - t0:.1f} s; Ctrl-C stops", flush=True)

    code = server.serve_until_signalled(announce)
    print("medseg server stopped", flush=True)
    return code


def cmd_segment(args: argparse.Namespace) -> int:
    from medseg_client.segment import segment_to_dir

    doc = segment_to_dir(args.url, args.input, args.out, args.model_name, args.timeout, args.series,
                         shared_memory=args.shared_memory, tenant_key=args.tenant_key, tls_ca=args.tls_ca,
                         admin_key=os.environ.get("MEDSEG_ADMIN_KEY"))
    print(summary(doc))
    print(f"wrote {args.out}/labels.nii.gz and findings.json")
    return 0


def summary(doc: dict[str, Any]) -> str:
    """A few human lines of a findings document."""
    f = doc["findings"]
    lines = [f"liver: {'found' if f['liver']['found'] else 'NOT found'}, {f['liver']['volume_ml']:.0f} mL; "
             f"{len(f['tumors'])} tumor(s), burden {f['tumor_burden_ml']:.2f} mL"]
    for t in f["tumors"]:
        lines.append(f"  tumor {t['id']}: {t['volume_ml']:.2f} mL, longest axial diameter "
                     f"{t['longest_axial_diameter_mm']:.1f} mm, mean {t['mean_hu']:.0f} HU, "
                     f"centre (LPS) {', '.join(f'{v:.1f}' for v in t['centroid_lps_mm'])} mm")
    lines.append("timings: " + ", ".join(f"{k} {v:.2f}" for k, v in doc["timings_s"].items()))
    return "\n".join(lines)


def cmd_mig(args: argparse.Namespace) -> int:
    from medseg import mig

    gpu, tenants = mig.load_tenants(args.tenants)
    layout = mig.plan(gpu, tenants)
    if args.mig_command == "plan":
        print(mig.describe(layout))
        print("\ncommands (as root on the GPU host):")
        print("\n".join("  " + c for c in mig.commands(layout, args.gpu)))
        return 0
    from medseg import mig_compose

    try:
        listing = args.devices.read_text()
    except OSError as e:
        raise mig.PlanError(f"cannot read {args.devices} (the output of `nvidia-smi -L`): {e.strerror}") from e
    devices = mig.assign_devices(layout, mig.parse_nvidia_smi_l(listing), args.gpu)
    for path in mig_compose.write(layout, devices, args.out):
        print(f"wrote {path}")
    for name, d in devices.items():
        print(f"  {name}: {d.profile} on {d.uuid}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from medseg_client.demo import run_demo

    return run_demo(args.out, args.seed)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medseg", description="CT liver and liver-tumor segmentation on Triton")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic abdominal CT study with its ground truth")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", choices=("dicom", "nifti"), default="dicom")
    p.add_argument("--slices", type=int, default=None, help="override the number of slices")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("serve", help="run the embedded Triton server on model_repository/")
    p.add_argument("--flavor", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--http", action="store_true", help="also serve Triton's HTTP API on --http-port (off by default)")
    p.add_argument("--tls-cert", type=Path, default=None, help="serve gRPC over TLS with this certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="the TLS certificate's private key (PEM)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("segment", help="segment a DICOM series folder or a NIfTI file through the server")
    p.add_argument("-u", "--url", default="localhost:8001", help="gRPC HOST:PORT of the server")
    p.add_argument("-m", "--model-name", default=SPEC.ensemble.name)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the request")
    p.add_argument("input", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--series", default=None, help="SeriesInstanceUID to read from a folder holding several")
    p.add_argument("--shared-memory", action="store_true",
                   help="on the server's host: pass the volume and labels through system shared memory, not gRPC")
    p.add_argument("--tls-ca", type=Path, default=None, help="connect over TLS, verifying the server with this CA (PEM)")
    p.add_argument("--tenant-key", default=os.environ.get("MEDSEG_TENANT_KEY"),
                   help="the tenant's key for a medseg gateway (default: $MEDSEG_TENANT_KEY; prefer the variable, "
                        "command lines are visible to other users)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("mig", help="MIG multi-tenant serving: plan a GPU's layout, write its compose file")
    msub = p.add_subparsers(dest="mig_command", required=True)
    q = msub.add_parser("plan", help="check the tenants' profiles fit one GPU; print the layout and nvidia-smi commands")
    q.add_argument("tenants", type=Path, help="tenants YAML file")
    q.add_argument("--gpu", type=int, default=0, help="GPU index on the host")
    q.set_defaults(func=cmd_mig)
    q = msub.add_parser("compose", help="write one Triton service per MIG instance and the tenants' gateway")
    q.add_argument("tenants", type=Path, help="tenants YAML file")
    q.add_argument("--devices", type=Path, required=True, help="the output of `nvidia-smi -L` after creating the layout")
    q.add_argument("--gpu", type=int, default=0, help="GPU index on the host")
    q.add_argument("--out", type=Path, default=Path("."), help="folder for docker-compose.mig.yml and gateway/")
    q.set_defaults(func=cmd_mig)

    p = sub.add_parser("demo", help="serve, segment an unseen phantom, compare with its ground truth, stop")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--seed", type=int, default=5002)
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MedsegError as e:
        print(f"medseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
